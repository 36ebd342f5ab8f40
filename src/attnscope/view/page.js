/* attnscope page: head view, model view and matrix view of one capture.
 * No network, no framework. Every string from the data (module names, kinds, tokens, the
 * title, table cells) is set with textContent or a DOM property, never as markup. */
function attnscopeRender(rootId) {
  "use strict";
  var root = document.getElementById(rootId);
  var data = JSON.parse(document.getElementById(rootId + "-data").textContent);
  var maps = data.maps;
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
                "#7b4173", "#3182bd"];
  var state = { map: 0, head: 0, query: -1, visible: null };
  var cache = {};

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function decode(b64) {
    var raw = atob(b64), out = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }
  function weights(m, h) {  // Uint8Array q*k, or null when only the thumbnail was kept
    var key = m + ":" + h;
    if (!(key in cache)) {
      var b64 = maps[m].data[h];
      cache[key] = b64 === null ? null : decode(b64);
    }
    return cache[key];
  }
  function exact(m, h, i, j) {
    if (!data.exact) return null;
    var key = "x" + m + ":" + h;
    if (!(key in cache)) cache[key] = new Float32Array(decode(maps[m].exact[h]).buffer);
    return cache[key][i * maps[m].k + j];
  }
  function thumb(m, h) {
    var key = "t" + m + ":" + h;
    if (!(key in cache)) cache[key] = decode(maps[m].thumb.data[h]);
    return cache[key];
  }
  function color(v) {  // v in 0..255 -> white to dark blue
    var t = v / 255;
    return [Math.round(255 - 225 * t), Math.round(255 - 160 * t), Math.round(255 - 75 * t)];
  }
  function paint(canvas, values, rows, cols) {
    canvas.width = cols; canvas.height = rows;
    var ctx = canvas.getContext("2d"), image = ctx.createImageData(cols, rows);
    for (var i = 0; i < rows * cols; i++) {
      var c = color(values[i]);
      image.data[4 * i] = c[0]; image.data[4 * i + 1] = c[1];
      image.data[4 * i + 2] = c[2]; image.data[4 * i + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
  }

  // -- layout -------------------------------------------------------------------------------
  root.textContent = "";
  root.appendChild(el("h2", "attnscope-title", data.title || "attnscope"));
  if (data.note) root.appendChild(el("p", "attnscope-note", data.note));
  var controls = el("div", "attnscope-controls");
  var layerLabel = el("label", null, "Module ");
  var select = el("select", "attnscope-layer");
  maps.forEach(function (m, index) {
    var option = el("option", null, m.name + " (" + m.kind + ")");
    option.value = String(index);
    select.appendChild(option);
  });
  layerLabel.appendChild(select);
  controls.appendChild(layerLabel);
  var headBox = el("span", "attnscope-heads");
  controls.appendChild(headBox);
  root.appendChild(controls);

  var views = el("div", "attnscope-views");
  var headPanel = el("section", "attnscope-panel attnscope-headview");
  headPanel.appendChild(el("h3", null, "Head view"));
  var headArea = el("div", "attnscope-headarea");
  var left = el("div", "attnscope-tokens attnscope-left");
  var lines = el("canvas", "attnscope-lines");
  var right = el("div", "attnscope-tokens attnscope-right");
  headArea.appendChild(left); headArea.appendChild(lines); headArea.appendChild(right);
  headPanel.appendChild(headArea);

  var matrixPanel = el("section", "attnscope-panel attnscope-matrixview");
  var matrixTitle = el("h3", null, "Matrix view");
  matrixPanel.appendChild(matrixTitle);
  // A grid (page.css): key caption and key ticks above the matrix, query caption and query
  // ticks to its left; the box scrolls when a long sequence makes the matrix large.
  var plotBox = el("div", "attnscope-plotbox");
  var plot = el("div", "attnscope-plot");
  var keyCaption = el("div", "attnscope-caption attnscope-keycaption");
  var queryCaption = el("div", "attnscope-caption attnscope-querycaption");
  var xAxis = el("div", "attnscope-axis attnscope-xaxis");
  var yAxis = el("div", "attnscope-axis attnscope-yaxis");
  var matrix = el("canvas", "attnscope-matrix");
  var tooltip = el("div", "attnscope-tooltip");
  [keyCaption, xAxis, queryCaption, yAxis, matrix].forEach(function (node) {
    plot.appendChild(node);
  });
  plotBox.appendChild(plot);
  matrixPanel.appendChild(plotBox);
  matrixPanel.appendChild(tooltip);  // outside the scrolling box, which would clip it

  var modelPanel = el("section", "attnscope-panel attnscope-modelview");
  modelPanel.appendChild(el("h3", null, "Model view (each head, pooled; click to open)"));
  var grid = el("div", "attnscope-grid");
  modelPanel.appendChild(grid);

  views.appendChild(headPanel); views.appendChild(matrixPanel);
  root.appendChild(views);
  root.appendChild(modelPanel);

  if (data.table && data.table.length) {
    var statsPanel = el("section", "attnscope-panel attnscope-stats");
    statsPanel.appendChild(el("h3", null, "Head statistics"));
    var table = el("table", "attnscope-table"), columns = Object.keys(data.table[0]);
    var header = el("tr");
    columns.forEach(function (c) { header.appendChild(el("th", null, c)); });
    table.appendChild(header);
    data.table.forEach(function (row) {
      var line = el("tr");
      columns.forEach(function (c) {  // null: a NaN or missing cell, shown empty
        line.appendChild(el("td", null, row[c] === null || row[c] === undefined ? "" : String(row[c])));
      });
      table.appendChild(line);
    });
    statsPanel.appendChild(table);
    root.appendChild(statsPanel);
  }

  // -- model view ---------------------------------------------------------------------------
  maps.forEach(function (m, index) {
    var row = el("div", "attnscope-row");
    row.appendChild(el("div", "attnscope-rowlabel", m.name));
    for (var h = 0; h < m.heads; h++) {
      var canvas = el("canvas", "attnscope-thumb");
      canvas.title = m.name + ", head " + h;
      canvas.dataset.map = String(index); canvas.dataset.head = String(h);
      paint(canvas, thumb(index, h), m.thumb.q, m.thumb.k);
      canvas.addEventListener("click", function (event) {
        choose(Number(event.currentTarget.dataset.map), Number(event.currentTarget.dataset.head));
      });
      row.appendChild(canvas);
    }
    grid.appendChild(row);
  });

  // -- head view ----------------------------------------------------------------------------
  function buildHeads() {
    var m = maps[state.map];
    headBox.textContent = "";
    headBox.appendChild(el("span", null, " Heads: "));
    for (var h = 0; h < m.heads; h++) {
      var label = el("label", "attnscope-headtoggle");
      var box = el("input");
      box.type = "checkbox"; box.checked = state.visible[h]; box.dataset.head = String(h);
      box.addEventListener("change", function (event) {
        state.visible[Number(event.target.dataset.head)] = event.target.checked;
        drawLines();
      });
      label.style.borderColor = COLORS[h % COLORS.length];
      label.appendChild(box);
      label.appendChild(el("span", null, String(h)));
      headBox.appendChild(label);
    }
  }
  function buildTokens() {
    var m = maps[state.map];
    left.textContent = ""; right.textContent = "";
    m.qlabels.forEach(function (token, i) {
      var node = el("div", "attnscope-token", token);
      node.addEventListener("mouseenter", function () { state.query = i; drawLines(); });
      node.addEventListener("mouseleave", function () { state.query = -1; drawLines(); });
      left.appendChild(node);
    });
    m.klabels.forEach(function (token) { right.appendChild(el("div", "attnscope-token", token)); });
  }
  function drawLines() {
    var m = maps[state.map];
    var rowHeight = 18, height = Math.max(m.q, m.k) * rowHeight, width = 160;
    lines.width = width; lines.height = height;
    lines.style.height = height + "px";
    var ctx = lines.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    var dense = m.q * m.k > 4096, threshold = dense ? 25 : 3;
    for (var h = 0; h < m.heads; h++) {
      if (!state.visible[h]) continue;
      var values = weights(state.map, h) || null;
      if (values === null) continue;
      ctx.strokeStyle = COLORS[h % COLORS.length];
      for (var i = 0; i < m.q; i++) {
        if (state.query >= 0 && i !== state.query) continue;
        for (var j = 0; j < m.k; j++) {
          var v = values[i * m.k + j];
          if (v < threshold) continue;
          ctx.globalAlpha = Math.min(1, v / 255);
          ctx.lineWidth = 1.5;
          ctx.beginPath();
          ctx.moveTo(0, i * rowHeight + rowHeight / 2);
          ctx.lineTo(width, j * rowHeight + rowHeight / 2);
          ctx.stroke();
        }
      }
    }
    ctx.globalAlpha = 1;
  }

  // -- matrix view --------------------------------------------------------------------------
  var SIDE = 360;  // px of the matrix's longer side, unless that would be under 1 px a token
  var TICK = 13;   // px a tick label needs across its axis (its line height in page.css)
  var LABEL = 16;  // characters of a tick label before it is cut (the full text is its title)
  function tickStep(n, length) {
    // The smallest of 1, 2, 5, 10, 20, 50, ... that keeps neighbouring labels TICK px apart:
    // round steps make the thinned positions easy to read (0, 20, 40, ...).
    var least = n * TICK / length;
    for (var unit = 1; ; unit *= 10) {
      for (var f = 0; f < 3; f++) if ([1, 2, 5][f] * unit >= least) return [1, 2, 5][f] * unit;
    }
  }
  function ticks(axis, labels, length, across) {
    // A label sits at the centre of its row (or column) whatever the canvas's resolution.
    axis.textContent = "";
    var n = labels.length, step = tickStep(n, length), longest = 1;
    for (var i = 0; i < n; i += step) {
      var centre = (i + 0.5) / n * length;
      var tick = el("div", across ? "attnscope-xtick" : "attnscope-ytick", labels[i]);
      tick.title = i + ": " + labels[i];
      tick.dataset.index = String(i);
      var mark = el("div", across ? "attnscope-xmark" : "attnscope-ymark");
      if (across) {
        tick.style.left = (centre - TICK / 2) + "px"; mark.style.left = centre + "px";
      } else {
        tick.style.top = (centre - TICK / 2) + "px"; mark.style.top = centre + "px";
      }
      axis.appendChild(tick); axis.appendChild(mark);
      longest = Math.max(longest, Math.min(LABEL, labels[i].length));
    }
    axis.dataset.step = String(step);
    return longest;
  }
  function drawMatrix() {
    var m = maps[state.map], values = weights(state.map, state.head);
    matrixTitle.textContent = "Matrix view: " + m.name + ", head " + state.head +
      (values === null ? " (pooled thumbnail: full resolution not embedded)" : "");
    if (values === null) {
      paint(matrix, thumb(state.map, state.head), m.thumb.q, m.thumb.k);
    } else {
      paint(matrix, values, m.q, m.k);
    }
    // Sized by tokens, not canvas pixels, so a pooled thumbnail shows as large as the full map.
    var scale = Math.max(1, SIDE / Math.max(m.q, m.k));
    var width = m.k * scale, height = m.q * scale;
    matrix.style.width = width + "px";
    matrix.style.height = height + "px";
    var cross = m.kind === "cross";
    keyCaption.textContent = "keys" + (cross ? " (source tokens)" : "") + " \u2192";
    // vertical text turns the arrow with it: it points down the query axis
    queryCaption.textContent = "queries" + (cross ? " (target tokens)" : "") + " \u2192";
    xAxis.style.width = width + "px";
    xAxis.style.height = (ticks(xAxis, m.klabels, width, true) + 1) + "ch";
    yAxis.style.height = height + "px";
    yAxis.style.width = (ticks(yAxis, m.qlabels, height, false) + 1) + "ch";
  }
  matrix.addEventListener("mousemove", function (event) {
    var m = maps[state.map], rect = matrix.getBoundingClientRect();
    var values = weights(state.map, state.head);
    var rows = values === null ? m.thumb.q : m.q, cols = values === null ? m.thumb.k : m.k;
    var i = Math.floor((event.clientY - rect.top) / rect.height * rows);
    var j = Math.floor((event.clientX - rect.left) / rect.width * cols);
    if (i < 0 || j < 0 || i >= rows || j >= cols) { tooltip.style.display = "none"; return; }
    var text;
    if (values === null) {
      text = "pooled cell " + i + ", " + j;
    } else {
      var x = exact(state.map, state.head, i, j);
      var shown = x === null ? "≈" + (values[i * m.k + j] / 255).toFixed(3) : x.toFixed(4);
      text = "query " + i + " " + m.qlabels[i] + " → key " + j + " " + m.klabels[j] + ": " + shown;
    }
    tooltip.textContent = text;
    tooltip.style.display = "block";
    var box = matrixPanel.getBoundingClientRect();  // the tooltip's positioned parent
    tooltip.style.left = (event.clientX - box.left + 12) + "px";
    tooltip.style.top = (event.clientY - box.top + 12) + "px";
  });
  matrix.addEventListener("mouseleave", function () { tooltip.style.display = "none"; });

  // -- wiring -------------------------------------------------------------------------------
  function choose(mapIndex, head) {
    var changedMap = mapIndex !== state.map || state.visible === null;
    state.map = mapIndex; state.head = head; state.query = -1;
    if (changedMap) {
      state.visible = [];
      for (var h = 0; h < maps[mapIndex].heads; h++) state.visible.push(true);
      buildHeads(); buildTokens();
    }
    select.value = String(mapIndex);
    grid.querySelectorAll(".attnscope-thumb").forEach(function (c) {
      c.classList.toggle("attnscope-selected",
        Number(c.dataset.map) === mapIndex && Number(c.dataset.head) === head);
    });
    drawLines(); drawMatrix();
    root.dataset.selected = maps[mapIndex].name + "#" + head;
  }
  select.addEventListener("change", function () { choose(Number(select.value), 0); });
  choose(0, 0);
  root.dataset.ready = "true";
}
