/* attnscope page: head view, model view and matrix view of one capture.
 * No network, no framework. Every string from the data (module names, kinds, tokens, the
 * title, table cells) is set with textContent or a DOM property, never as markup.
 * Map sets (data.views: attention, grad x attention, norm-weighted): the same modules with
 * other values; a set after the first carries only its values per module, merged here over
 * the first set's entries. Switching sets swaps `maps` and its decoding cache, so every view
 * and export reads the chosen set through the same functions. A weighted set's bytes are
 * relative to each head's maximum (`scale`); byte / 255 * scale is the true value. */
function attnscopeRender(rootId, given) {
  "use strict";
  // `given`: the data object itself (the live explorer); else the page's JSON block
  var root = document.getElementById(rootId);
  var data = given || JSON.parse(document.getElementById(rootId + "-data").textContent);
  var weightViews = data.views || [{ by: "attention", label: "attention", exact: !!data.exact }];
  var VALUES = ["data", "thumb", "scale", "exact"];  // what a map set has of its own
  var sets = weightViews.map(function (v, s) {
    if (s === 0) return data.maps;
    return data.maps.map(function (base, i) {
      var entry = {};
      Object.keys(base).forEach(function (key) { if (VALUES.indexOf(key) < 0) entry[key] = base[key]; });
      VALUES.forEach(function (key) { if (key in v.maps[i]) entry[key] = v.maps[i][key]; });
      return entry;
    });
  });
  var caches = sets.map(function () { return {}; });
  var ATTENTION = -1;  // the set whose weights the query/key view lists
  weightViews.forEach(function (v, s) { if (v.by === "attention" && ATTENTION < 0) ATTENTION = s; });
  var maps = sets[0];
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
                "#7b4173", "#3182bd"];
  var state = { map: 0, head: 0, query: -1, visible: null, words: false, qkQuery: 0, set: 0 };
  var cache = caches[0];

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
  function row(m, h, i) {  // one row of a full map, decoding only its base64 span if need be
    var key = m + ":" + h, cols = maps[m].k;
    if (key in cache) return cache[key] === null ? null : cache[key].subarray(i * cols, (i + 1) * cols);
    var b64 = maps[m].data[h];
    if (b64 === null) return null;
    var first = Math.floor(i * cols / 3), last = Math.ceil((i + 1) * cols / 3);
    var bytes = decode(b64.slice(4 * first, 4 * last)), offset = i * cols - 3 * first;
    return bytes.subarray(offset, offset + cols);
  }
  function exact(m, h, i, j) {
    if (!maps[m].exact) return null;
    var key = "x" + m + ":" + h;
    if (!(key in cache)) cache[key] = new Float32Array(decode(maps[m].exact[h]).buffer);
    return cache[key][i * maps[m].k + j];
  }
  function scaleOf(m, h) { return maps[m].scale ? maps[m].scale[h] : 1; }  // true value of byte 255
  function scaled() { return !!maps[state.map].scale; }
  function attentionWeight(m, h, i, j) {  // the attention set's weight, whichever set is shown
    var saved = [maps, cache], s = ATTENTION < 0 ? state.set : ATTENTION;
    maps = sets[s]; cache = caches[s];
    try {
      var own = exact(m, h, i, j), values = weights(m, h);
      return own !== null ? own : (values === null ? NaN : values[i * maps[m].k + j] / 255 * scaleOf(m, h));
    } finally { maps = saved[0]; cache = saved[1]; }
  }
  function thumb(m, h) {
    var key = "t" + m + ":" + h;
    if (!(key in cache)) cache[key] = decode(maps[m].thumb.data[h]);
    return cache[key];
  }
  function identity(n) {
    var groups = [];
    for (var i = 0; i < n; i++) groups.push([i]);
    return groups;
  }
  function merging(m) { return state.words && !!(m.qwords || m.kwords); }
  function axisLabels(m) {
    if (!merging(m)) return { q: m.qlabels, k: m.klabels };
    return { q: m.qwords ? m.qwords.labels : m.qlabels, k: m.kwords ? m.kwords.labels : m.klabels };
  }
  // What the views draw for head h of map mi: {u8 (0..255), f32 (exact values or null), rows,
  // cols, pooled, peak (the true value byte 255 stands for)}. With "words" on, rows are
  // averaged within a word and columns summed (AttentionMaps.merge_tokens' convention), from
  // the embedded values; a weighted set's merged map is quantised to its own maximum again.
  function shown(mi, h) {
    var m = maps[mi], values = weights(mi, h);
    if (values === null) {
      return { u8: thumb(mi, h), f32: null, rows: m.thumb.q, cols: m.thumb.k, pooled: true,
        peak: m.thumb.peak ? m.thumb.peak[h] : 1 };
    }
    if (!merging(m)) return { u8: values, f32: null, rows: m.q, cols: m.k, pooled: false, peak: scaleOf(mi, h) };
    var key = "w" + mi + ":" + h;
    if (!(key in cache)) {
      var qg = m.qwords ? m.qwords.groups : identity(m.q), kg = m.kwords ? m.kwords.groups : identity(m.k);
      var out = new Float32Array(qg.length * kg.length), u8 = new Uint8Array(out.length);
      var unit = scaleOf(mi, h) / 255, peak = m.scale ? 0 : 1;
      for (var a = 0; a < qg.length; a++) {
        for (var b = 0; b < kg.length; b++) {
          var total = 0;
          for (var r = 0; r < qg[a].length; r++) {
            var row = qg[a][r] * m.k;
            for (var c = 0; c < kg[b].length; c++) total += values[row + kg[b][c]];
          }
          var v = total * unit / qg[a].length;
          out[a * kg.length + b] = v;
          if (m.scale) peak = Math.max(peak, v);
        }
      }
      for (var n = 0; n < out.length; n++) u8[n] = Math.min(255, Math.round(out[n] / (peak || 1) * 255));
      cache[key] = { u8: u8, f32: out, rows: qg.length, cols: kg.length, pooled: false, peak: peak };
    }
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
  var setSelect = null;
  if (sets.length > 1) {  // attention | grad x attention | norm-weighted
    var weightLabel = el("label", null, "Values ");
    setSelect = el("select", "attnscope-weights");
    weightViews.forEach(function (v, index) {
      var option = el("option", null, v.label);
      option.value = String(index);
      setSelect.appendChild(option);
    });
    weightLabel.appendChild(setSelect);
    controls.appendChild(weightLabel);
  }
  var wordBox = null;
  if (maps.some(function (m) { return m.qwords || m.kwords; })) {
    var wordLabel = el("label", "attnscope-wordtoggle");
    wordBox = el("input");
    wordBox.type = "checkbox";
    wordLabel.appendChild(wordBox);
    wordLabel.appendChild(el("span", null, " words (sub-word tokens merged: rows averaged, columns summed)"));
    controls.appendChild(wordLabel);
  }
  var headBox = el("span", "attnscope-heads");
  controls.appendChild(headBox);
  root.appendChild(controls);

  var views = el("div", "attnscope-views");
  var headPanel = el("section", "attnscope-panel attnscope-headview");
  headPanel.appendChild(el("h3", null, "Head view"));
  var headExport = el("div", "attnscope-export");
  var headPng = el("button", "attnscope-head-export-png", "Export PNG");
  var headSvg = el("button", "attnscope-head-export-svg", "Export SVG");
  headPng.type = "button"; headSvg.type = "button";
  headExport.appendChild(headPng); headExport.appendChild(headSvg);
  headPanel.appendChild(headExport);
  var headArea = el("div", "attnscope-headarea");
  var left = el("div", "attnscope-tokens attnscope-left");
  var lines = el("canvas", "attnscope-lines");
  var right = el("div", "attnscope-tokens attnscope-right");
  headArea.appendChild(left); headArea.appendChild(lines); headArea.appendChild(right);
  headPanel.appendChild(headArea);

  var matrixPanel = el("section", "attnscope-panel attnscope-matrixview");
  var matrixTitle = el("h3", null, "Matrix view");
  matrixPanel.appendChild(matrixTitle);
  var exportBar = el("div", "attnscope-export");
  var pngButton = el("button", "attnscope-export-png", "Export PNG");
  var svgButton = el("button", "attnscope-export-svg", "Export SVG");
  pngButton.type = "button"; svgButton.type = "button";
  exportBar.appendChild(pngButton); exportBar.appendChild(svgButton);
  matrixPanel.appendChild(exportBar);
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
  var legend = el("div", "attnscope-legend");
  var legendTop = el("span", "attnscope-legend-top");
  var legendNote = el("span", "attnscope-legend-note");
  legend.appendChild(el("span", null, "0"));
  legend.appendChild(el("span", "attnscope-legend-bar"));
  legend.appendChild(legendTop); legend.appendChild(legendNote);
  matrixPanel.appendChild(legend);
  matrixPanel.appendChild(tooltip);  // outside the scrolling box, which would clip it

  var modelPanel = el("section", "attnscope-panel attnscope-modelview");
  var modelTitle = el("h3", null, "Model view (each head, pooled; click to open)");
  modelPanel.appendChild(modelTitle);
  var grid = el("div", "attnscope-grid");
  modelPanel.appendChild(grid);

  views.appendChild(headPanel); views.appendChild(matrixPanel);
  root.appendChild(views);
  var qkPanel = el("section", "attnscope-panel attnscope-qkview");
  var qkTitle = el("h3", null, "Query/key view");
  var qkControls = el("div", "attnscope-controls");
  var qkLabel = el("label", null, "Query ");
  var qkSelect = el("select", "attnscope-qk-query");
  qkLabel.appendChild(qkSelect); qkControls.appendChild(qkLabel);
  var qkHelp = el("p", "attnscope-caption", "Per key: its k vector, the terms q\u2299k (each " +
    "dimension's share of the score), their sum q\u00b7k (the score before the mask, scale " +
    "included) and the weight. Rows: keys; the top row is q.");
  var qkCanvas = el("canvas", "attnscope-qk-canvas");
  var qkTable = el("table", "attnscope-table attnscope-qk-table");
  [qkTitle, qkControls, qkHelp, qkCanvas, qkTable].forEach(function (n) { qkPanel.appendChild(n); });
  root.appendChild(qkPanel);
  root.appendChild(modelPanel);

  // -- head importance: layers x heads, a cell per head, a click opens it -------------------
  var importanceCells = [];
  if (data.importance) {
    var imp = data.importance, span = (imp.hi - imp.lo) || 1;
    var impPanel = el("section", "attnscope-panel attnscope-importance");
    impPanel.appendChild(el("h3", null, "Head importance (layers \u00d7 heads; click a cell to open its head)"));
    var impGrid = el("div", "attnscope-imp-grid");
    impGrid.style.gridTemplateColumns = "auto repeat(" + imp.heads + ", 18px)";
    impGrid.appendChild(el("div"));
    for (var ih = 0; ih < imp.heads; ih++) impGrid.appendChild(el("div", "attnscope-imp-head", String(ih)));
    var impTip = el("div", "attnscope-imp-tooltip");
    imp.modules.forEach(function (name, row) {
      var mapIndex = -1;
      maps.forEach(function (m, index) { if (m.name === name && mapIndex < 0) mapIndex = index; });
      impGrid.appendChild(el("div", "attnscope-rowlabel", name));
      imp.values[row].forEach(function (value, head) {
        var cell = el("div", "attnscope-imp-cell");
        var opens = mapIndex >= 0 && head < maps[mapIndex].heads;
        cell.dataset.module = name; cell.dataset.head = String(head);
        cell.dataset.map = String(opens ? mapIndex : -1);
        if (value === null) cell.classList.add("attnscope-imp-empty");
        else cell.style.backgroundColor = rgb(Math.round((value - imp.lo) / span * 255));
        if (!opens) cell.classList.add("attnscope-imp-absent");
        cell.addEventListener("mouseenter", function () {
          impTip.textContent = name + ", head " + head + ": " +
            (value === null ? "no value" : String(Number(value.toPrecision(6)))) +
            (opens ? "" : " (not in this page)");
          impTip.style.display = "block";
          var box = impPanel.getBoundingClientRect(), at = cell.getBoundingClientRect();
          impTip.style.transform = "translate(" + (at.right - box.left + 6) + "px, " + (at.bottom - box.top + 6) + "px)";
        });
        cell.addEventListener("mouseleave", function () { impTip.style.display = "none"; });
        cell.addEventListener("click", function () { if (opens) choose(mapIndex, head); });
        importanceCells.push(cell);
        impGrid.appendChild(cell);
      });
    });
    impPanel.appendChild(impGrid);
    impPanel.appendChild(impTip);
    root.appendChild(impPanel);
  }

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
      canvas.addEventListener("click", function (event) {
        choose(Number(event.currentTarget.dataset.map), Number(event.currentTarget.dataset.head));
      });
      row.appendChild(canvas);
    }
    grid.appendChild(row);
  });
  function paintThumbs() {  // each head of the shown set, pooled, relative to its maximum
    modelTitle.textContent = "Model view (each head, pooled" + setLabel() + "; click to open)";
    grid.querySelectorAll(".attnscope-thumb").forEach(function (canvas) {
      var index = Number(canvas.dataset.map), m = maps[index];
      paint(canvas, thumb(index, Number(canvas.dataset.head)), m.thumb.q, m.thumb.k);
    });
  }
  paintThumbs();

  // -- head view ----------------------------------------------------------------------------
  var LINES_ALL = 65536;  // cells of a head beyond which lines wait for a hovered token
  function rowHeight(n) { return Math.max(6, Math.min(18, Math.floor(30000 / Math.max(1, n)))); }
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
    var labels = axisLabels(maps[state.map]);
    var height = rowHeight(Math.max(labels.q.length, labels.k.length)) + "px";
    left.textContent = ""; right.textContent = "";
    labels.q.forEach(function (token, i) {
      var node = el("div", "attnscope-token", token);
      node.style.height = height; node.style.lineHeight = height;
      node.addEventListener("mouseenter", function () { state.query = i; drawLines(); });
      node.addEventListener("mouseleave", function () { state.query = -1; drawLines(); });
      left.appendChild(node);
    });
    labels.k.forEach(function (token) {
      var node = el("div", "attnscope-token", token);
      node.style.height = height; node.style.lineHeight = height;
      right.appendChild(node);
    });
  }
  var LINES_WIDTH = 160;
  function headSegments() {  // the head view's lines: [query, key, head, opacity] each
    var m = maps[state.map], labels = axisLabels(m), segments = [];
    var rows = labels.q.length, cols = labels.k.length;
    var threshold = rows * cols > 4096 ? 25 : 3, long = rows * cols > LINES_ALL;
    var result = { rows: rows, cols: cols, step: rowHeight(Math.max(rows, cols)), segments: segments, labels: labels };
    if (long && state.query < 0) return result;  // too many lines to read: they wait for a hovered token
    for (var h = 0; h < m.heads; h++) {
      if (!state.visible[h]) continue;
      // a long token-level map reads just the hovered row, without decoding the whole head
      var single = long && !merging(m), view = single ? null : shown(state.map, h);
      if (single ? m.data[h] === null : view.pooled) continue;
      var values = single ? row(state.map, h, state.query) : view.u8;
      for (var i = 0; i < rows; i++) {
        if (state.query >= 0 && i !== state.query) continue;
        var at = single ? 0 : i * cols;
        for (var j = 0; j < cols; j++) {
          var v = values[at + j];
          if (v >= threshold) segments.push([i, j, h, Math.min(1, v / 255)]);
        }
      }
    }
    return result;
  }
  function strokeSegments(ctx, lines, x0, y0) {
    // one path per head and opacity: a dense map (a weighted set, relative to its maximum)
    // has 10^5 lines, and one stroke each took a second
    var groups = {};
    lines.segments.forEach(function (s) {
      var key = s[2] + ":" + s[3];
      (groups[key] = groups[key] || []).push(s);
    });
    ctx.lineWidth = 1.5;
    Object.keys(groups).forEach(function (key) {
      var group = groups[key];
      ctx.strokeStyle = COLORS[group[0][2] % COLORS.length];
      ctx.globalAlpha = group[0][3];
      ctx.beginPath();
      group.forEach(function (s) {
        ctx.moveTo(x0, y0 + s[0] * lines.step + lines.step / 2);
        ctx.lineTo(x0 + LINES_WIDTH, y0 + s[1] * lines.step + lines.step / 2);
      });
      ctx.stroke();
    });
    ctx.globalAlpha = 1;
  }
  function drawLines() {
    var found = headSegments(), height = Math.max(found.rows, found.cols) * found.step;
    lines.width = LINES_WIDTH; lines.height = height;
    lines.style.height = height + "px";
    var ctx = lines.getContext("2d");
    ctx.clearRect(0, 0, LINES_WIDTH, height);
    strokeSegments(ctx, found, 0, 0);
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
  function setLabel() {  // "" for attention, else ", norm-weighted" and the like
    var v = weightViews[state.set];
    return v.by === "attention" ? "" : ", " + v.label;
  }
  function viewTitle() {
    var m = maps[state.map], view = shown(state.map, state.head);
    return m.name + ", head " + state.head + setLabel() + (merging(m) && !view.pooled ? " (words)" : "") +
      (view.pooled ? " (pooled thumbnail: full resolution not embedded)" : "");
  }
  function drawLegend(view) {  // the colour scale of the shown map: white 0 to dark blue peak
    var peak = view.peak, top = scaled() || view.pooled ? number(peak, 3) : "1";
    legendTop.textContent = top;
    legend.title = scaled() ? "colour relative to this map's maximum, " + number(peak, 5) :
      (view.pooled ? "colour relative to this head's maximum weight" : "attention weight");
    legendNote.textContent = scaled() ? "(" + weightViews[state.set].label + ", this map's maximum)" :
      (view.pooled ? "(this head's maximum)" : "");
  }
  function drawMatrix() {
    var m = maps[state.map], view = shown(state.map, state.head), labels = axisLabels(m);
    matrixTitle.textContent = "Matrix view: " + viewTitle();
    paint(matrix, view.u8, view.rows, view.cols);
    drawLegend(view);
    // Sized by tokens, not canvas pixels, so a pooled thumbnail shows as large as the full map.
    var nq = labels.q.length, nk = labels.k.length;
    var scale = Math.max(1, SIDE / Math.max(nq, nk));
    var width = nk * scale, height = nq * scale;
    matrix.style.width = width + "px";
    matrix.style.height = height + "px";
    var cross = m.kind === "cross";
    keyCaption.textContent = "keys" + (cross ? " (source tokens)" : "") + " \u2192";
    // vertical text turns the arrow with it: it points down the query axis
    queryCaption.textContent = "queries" + (cross ? " (target tokens)" : "") + " \u2192";
    xAxis.style.width = width + "px";
    xAxis.style.height = (ticks(xAxis, labels.k, width, true) + 1) + "ch";
    yAxis.style.height = height + "px";
    yAxis.style.width = (ticks(yAxis, labels.q, height, false) + 1) + "ch";
  }
  function number(x, digits) {  // weights as fixed decimals; a weighted set's values by precision
    return scaled() ? String(Number(x.toPrecision(digits + 1))) : x.toFixed(digits);
  }
  function cellAt(event) {
    var view = shown(state.map, state.head), rect = matrix.getBoundingClientRect();
    var i = Math.floor((event.clientY - rect.top) / rect.height * view.rows);
    var j = Math.floor((event.clientX - rect.left) / rect.width * view.cols);
    return (i < 0 || j < 0 || i >= view.rows || j >= view.cols) ? null : [i, j, view];
  }
  matrix.addEventListener("mousemove", function (event) {
    var m = maps[state.map], cell = cellAt(event), labels = axisLabels(m);
    if (cell === null) { tooltip.style.display = "none"; return; }
    var i = cell[0], j = cell[1], view = cell[2], text;
    if (view.pooled) {
      text = "pooled cell " + i + ", " + j;
    } else {
      var x = view.f32 ? view.f32[i * view.cols + j] : exact(state.map, state.head, i, j);
      var shownValue = x === null ? "\u2248" + number(view.u8[i * view.cols + j] / 255 * view.peak, 3)
        : (view.f32 ? "\u2248" + number(x, 3) : number(x, 4));
      var unit = view.f32 ? "word " : "";
      text = "query " + unit + i + " " + labels.q[i] + " \u2192 key " + unit + j + " " +
        labels.k[j] + ": " + shownValue;
    }
    tooltip.textContent = text;
    tooltip.style.display = "block";
    var box = matrixPanel.getBoundingClientRect();  // the tooltip's positioned parent
    // moved by a transform: its own layer slides, nothing under it is painted again
    tooltip.style.transform = "translate(" + (event.clientX - box.left + 12) + "px, " +
      (event.clientY - box.top + 12) + "px)";
  });
  matrix.addEventListener("mouseleave", function () { tooltip.style.display = "none"; });
  matrix.addEventListener("click", function (event) {  // a row opens in the query/key view
    var cell = cellAt(event);
    if (cell !== null && !cell[2].pooled && !merging(maps[state.map]) && maps[state.map].qk) {
      state.qkQuery = cell[0]; qkSelect.value = String(cell[0]); drawQK();
    }
  });

  // -- query/key view (lazy captures) -------------------------------------------------------
  function floats(key, b64) {
    if (!(key in cache)) cache[key] = new Float32Array(decode(b64).buffer);
    return cache[key];
  }
  function diverging(v, peak) {  // -peak..peak -> blue, white, red
    var t = Math.max(-1, Math.min(1, v / (peak || 1)));
    return t >= 0 ? [255, Math.round(255 - 200 * t), Math.round(255 - 200 * t)]
      : [Math.round(255 + 200 * t), Math.round(255 + 200 * t), 255];
  }
  function buildQK() {
    var m = maps[state.map];
    qkPanel.style.display = m.qk ? "" : "none";
    if (!m.qk) return;
    qkSelect.textContent = "";
    m.qlabels.forEach(function (token, i) {
      var option = el("option", null, i + ": " + token);
      option.value = String(i);
      qkSelect.appendChild(option);
    });
    state.qkQuery = Math.min(state.qkQuery, m.q - 1);
    qkSelect.value = String(state.qkQuery);
  }
  function qkTerms() {  // {q, k(j), terms(j), score(j)} of the chosen head and query
    var m = maps[state.map], d = m.qk.dim, i = state.qkQuery, h = state.head;
    var qs = floats("q" + state.map + ":" + h, m.qk.q[h]), ks = floats("k" + state.map + ":" + h, m.qk.k[h]);
    var q = qs.subarray(i * d, (i + 1) * d), scores = new Float64Array(m.k);
    for (var j = 0; j < m.k; j++) {
      var total = 0;
      for (var c = 0; c < d; c++) total += q[c] * ks[j * d + c];
      scores[j] = total;
    }
    return { q: q, ks: ks, d: d, scores: scores };
  }
  function drawQK() {
    var m = maps[state.map];
    if (!m.qk) return;
    var t = qkTerms(), i = state.qkQuery, d = t.d;
    qkTitle.textContent = "Query/key view: " + m.name + ", head " + state.head + ", query " + i +
      " " + m.qlabels[i];
    var cell = m.k > 128 ? 2 : 8, gap = 6, width = (2 * d) * cell + gap, height = (m.k + 1) * cell + gap;
    qkCanvas.width = width; qkCanvas.height = height;
    var ctx = qkCanvas.getContext("2d"), peakK = 0, peakT = 0;
    for (var n = 0; n < m.k * d; n++) {
      peakK = Math.max(peakK, Math.abs(t.ks[n]));
      peakT = Math.max(peakT, Math.abs(t.ks[n] * t.q[n % d]));
    }
    for (var c = 0; c < d; c++) peakK = Math.max(peakK, Math.abs(t.q[c]));
    function fill(x, y, rgb) { ctx.fillStyle = "rgb(" + rgb.join(",") + ")"; ctx.fillRect(x, y, cell, cell); }
    for (c = 0; c < d; c++) fill(c * cell, 0, diverging(t.q[c], peakK));
    for (var j = 0; j < m.k; j++) {
      var y = (j + 1) * cell + gap;
      for (c = 0; c < d; c++) {
        var kv = t.ks[j * d + c];
        fill(c * cell, y, diverging(kv, peakK));
        fill((d + c) * cell + gap, y, diverging(kv * t.q[c], peakT));
      }
    }
    qkTable.textContent = "";
    var header = el("tr");
    ["key", "token", "q\u00b7k", ATTENTION < 0 ? weightViews[state.set].label : "weight"].forEach(function (c) { header.appendChild(el("th", null, c)); });
    qkTable.appendChild(header);
    for (j = 0; j < Math.min(m.k, 512); j++) {
      var line = el("tr", "attnscope-qk-row");
      var w = attentionWeight(state.map, state.head, i, j);
      line.appendChild(el("td", null, String(j)));
      line.appendChild(el("td", null, m.klabels[j]));
      line.appendChild(el("td", "attnscope-qk-score", t.scores[j].toFixed(4)));
      line.appendChild(el("td", "attnscope-qk-weight", isNaN(w) ? "" : w.toFixed(4)));
      qkTable.appendChild(line);
    }
  }
  qkSelect.addEventListener("change", function () { state.qkQuery = Number(qkSelect.value); drawQK(); });

  // -- export: the matrix view as SVG (built from its data) and PNG (drawn on a canvas) -----
  function exportLayout() {
    var m = maps[state.map], view = shown(state.map, state.head), labels = axisLabels(m);
    var nq = labels.q.length, nk = labels.k.length;
    var cell = Math.max(1, Math.min(24, Math.floor(720 / Math.max(nq, nk))));
    var chars = 1;
    labels.q.concat(labels.k).forEach(function (l) { chars = Math.max(chars, Math.min(LABEL, l.length)); });
    var margin = chars * 7 + 12, top = 24;
    var qStep = tickStep(nq, nq * cell), kStep = tickStep(nk, nk * cell);
    return { m: m, view: view, labels: labels, nq: nq, nk: nk, cell: cell, margin: margin, top: top,
      qStep: qStep, kStep: kStep, width: margin + nk * cell + 8, height: top + margin + nq * cell + 8,
      title: viewTitle() };
  }
  function cut(label) { return label.length > LABEL ? label.slice(0, LABEL - 1) + "\u2026" : label; }
  function rgb(v) { return "rgb(" + color(v).join(",") + ")"; }
  function buildSVG() {
    var L = exportLayout(), NS = "http://www.w3.org/2000/svg", v = L.view;
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("xmlns", NS);
    svg.setAttribute("width", String(L.width)); svg.setAttribute("height", String(L.height));
    svg.setAttribute("font-family", "sans-serif"); svg.setAttribute("font-size", "11");
    function node(tag, attrs, text) {
      var n = document.createElementNS(NS, tag);
      Object.keys(attrs).forEach(function (a) { n.setAttribute(a, String(attrs[a])); });
      if (text !== undefined) n.textContent = text;  // text, never markup
      svg.appendChild(n);
      return n;
    }
    node("rect", { x: 0, y: 0, width: L.width, height: L.height, fill: "#fff" });
    node("text", { x: 4, y: 14, "font-size": 12 }, L.title);
    var x0 = L.margin, y0 = L.top + L.margin, w = L.nk * L.cell, h = L.nq * L.cell;
    if (v.rows * v.cols <= 128 * 128) {
      var cw = w / v.cols, ch = h / v.rows;
      for (var i = 0; i < v.rows; i++) {
        for (var j = 0; j < v.cols; j++) {
          node("rect", { x: x0 + j * cw, y: y0 + i * ch, width: cw, height: ch, fill: rgb(v.u8[i * v.cols + j]) });
        }
      }
    } else {  // too many cells for one element each: the painted matrix, embedded
      paint(scratch, v.u8, v.rows, v.cols);
      node("image", { x: x0, y: y0, width: w, height: h, href: scratch.toDataURL("image/png"),
        preserveAspectRatio: "none", style: "image-rendering:pixelated" });
    }
    for (i = 0; i < L.nq; i += L.qStep) {
      node("text", { x: x0 - 4, y: y0 + (i + 0.5) * L.cell + 4, "text-anchor": "end" }, cut(L.labels.q[i]));
    }
    for (j = 0; j < L.nk; j += L.kStep) {
      var cx = x0 + (j + 0.5) * L.cell + 4;
      node("text", { x: cx, y: y0 - 4, transform: "rotate(-90 " + cx + " " + (y0 - 4) + ")" }, cut(L.labels.k[j]));
    }
    return new XMLSerializer().serializeToString(svg);
  }
  var scratch = document.createElement("canvas");
  function drawPNG() {
    var L = exportLayout(), v = L.view, canvas = document.createElement("canvas");
    canvas.width = L.width; canvas.height = L.height;
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, L.width, L.height);
    ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.fillText(L.title, 4, 14);
    var x0 = L.margin, y0 = L.top + L.margin;
    paint(scratch, v.u8, v.rows, v.cols);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(scratch, x0, y0, L.nk * L.cell, L.nq * L.cell);
    ctx.font = "11px sans-serif"; ctx.textAlign = "right";
    for (var i = 0; i < L.nq; i += L.qStep) ctx.fillText(cut(L.labels.q[i]), x0 - 4, y0 + (i + 0.5) * L.cell + 4);
    ctx.textAlign = "left";
    for (var j = 0; j < L.nk; j += L.kStep) {
      ctx.save(); ctx.translate(x0 + (j + 0.5) * L.cell + 4, y0 - 4); ctx.rotate(-Math.PI / 2);
      ctx.fillText(cut(L.labels.k[j]), 0, 0); ctx.restore();
    }
    return canvas;
  }
  function headLayout() {
    var found = headSegments(), chars = 1;
    found.labels.q.concat(found.labels.k).forEach(function (l) { chars = Math.max(chars, Math.min(LABEL, l.length)); });
    var margin = chars * 7 + 8, top = 24;
    found.margin = margin; found.top = top;
    found.width = 2 * margin + LINES_WIDTH; found.height = top + Math.max(found.rows, found.cols) * found.step + 4;
    found.title = "Head view: " + maps[state.map].name + setLabel() + (state.query >= 0 ? ", query " + state.query : "");
    return found;
  }
  function headSVG() {
    var L = headLayout(), NS = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("xmlns", NS);
    svg.setAttribute("width", String(L.width)); svg.setAttribute("height", String(L.height));
    svg.setAttribute("font-family", "sans-serif"); svg.setAttribute("font-size", "11");
    function node(tag, attrs, text) {
      var n = document.createElementNS(NS, tag);
      Object.keys(attrs).forEach(function (a) { n.setAttribute(a, String(attrs[a])); });
      if (text !== undefined) n.textContent = text;  // text, never markup
      svg.appendChild(n);
      return n;
    }
    node("rect", { x: 0, y: 0, width: L.width, height: L.height, fill: "#fff" });
    node("text", { x: 4, y: 14, "font-size": 12 }, L.title);
    var x0 = L.margin, y0 = L.top;
    L.segments.forEach(function (s) {
      node("line", { x1: x0, y1: y0 + (s[0] + 0.5) * L.step, x2: x0 + LINES_WIDTH,
        y2: y0 + (s[1] + 0.5) * L.step, stroke: COLORS[s[2] % COLORS.length],
        "stroke-opacity": s[3].toFixed(3), "stroke-width": 1.5 });
    });
    L.labels.q.forEach(function (t, i) {
      node("text", { x: x0 - 4, y: y0 + (i + 0.5) * L.step + 4, "text-anchor": "end" }, cut(t));
    });
    L.labels.k.forEach(function (t, j) {
      node("text", { x: x0 + LINES_WIDTH + 4, y: y0 + (j + 0.5) * L.step + 4 }, cut(t));
    });
    return new XMLSerializer().serializeToString(svg);
  }
  function headPNG() {
    var L = headLayout(), canvas = document.createElement("canvas");
    canvas.width = L.width; canvas.height = L.height;
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, L.width, L.height);
    ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.fillText(L.title, 4, 14);
    strokeSegments(ctx, L, L.margin, L.top);
    ctx.font = "11px sans-serif"; ctx.fillStyle = "#222"; ctx.textAlign = "right";
    L.labels.q.forEach(function (t, i) { ctx.fillText(cut(t), L.margin - 4, L.top + (i + 0.5) * L.step + 4); });
    ctx.textAlign = "left";
    L.labels.k.forEach(function (t, j) { ctx.fillText(cut(t), L.margin + LINES_WIDTH + 4, L.top + (j + 0.5) * L.step + 4); });
    return canvas;
  }
  headSvg.addEventListener("click", function () {
    download(new Blob([headSVG()], { type: "image/svg+xml" }), fileName("-headview.svg"));
  });
  headPng.addEventListener("click", function () {
    headPNG().toBlob(function (blob) { download(blob, fileName("-headview.png")); }, "image/png");
  });
  function fileName(extension) {
    var m = maps[state.map];
    var by = weightViews[state.set].by, prefix = by === "attention" ? "attention-" : by + "-weighted-";
    return (prefix + m.name + "-head" + state.head).replace(/[^A-Za-z0-9_.-]+/g, "_") + extension;
  }
  function download(blob, name) {
    var url = URL.createObjectURL(blob), link = document.createElement("a");
    link.href = url; link.download = name; link.style.display = "none";
    document.body.appendChild(link); link.click(); link.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
  }
  svgButton.addEventListener("click", function () {
    download(new Blob([buildSVG()], { type: "image/svg+xml" }), fileName(".svg"));
  });
  pngButton.addEventListener("click", function () {
    drawPNG().toBlob(function (blob) { download(blob, fileName(".png")); }, "image/png");
  });

  // -- wiring -------------------------------------------------------------------------------
  function choose(mapIndex, head) {
    var changedMap = mapIndex !== state.map || state.visible === null;
    state.map = mapIndex; state.head = head; state.query = -1;
    if (changedMap) {
      state.visible = [];
      for (var h = 0; h < maps[mapIndex].heads; h++) state.visible.push(true);
      buildHeads(); buildTokens(); buildQK();
    }
    select.value = String(mapIndex);
    grid.querySelectorAll(".attnscope-thumb").forEach(function (c) {
      c.classList.toggle("attnscope-selected",
        Number(c.dataset.map) === mapIndex && Number(c.dataset.head) === head);
    });
    importanceCells.forEach(function (c) {
      c.classList.toggle("attnscope-selected", Number(c.dataset.map) === mapIndex && Number(c.dataset.head) === head);
    });
    drawLines(); drawMatrix(); drawQK();
    root.dataset.selected = maps[mapIndex].name + "#" + head;
  }
  select.addEventListener("change", function () { choose(Number(select.value), 0); });
  function chooseSet(index) {  // the same module and head, another map set
    state.set = index; maps = sets[index]; cache = caches[index];
    if (setSelect) setSelect.value = String(index);
    paintThumbs(); drawLines(); drawMatrix(); drawQK();
    root.dataset.weights = weightViews[index].by;
  }
  if (setSelect) setSelect.addEventListener("change", function () { chooseSet(Number(setSelect.value)); });
  if (wordBox) {
    wordBox.addEventListener("change", function () {
      state.words = wordBox.checked; state.query = -1;
      buildTokens(); drawLines(); drawMatrix();
      root.dataset.words = String(state.words);
    });
  }
  choose(0, 0);
  root.dataset.weights = weightViews[0].by;
  // lay the tooltip out once now, so that the first hover does not pay for its styles
  tooltip.style.visibility = "hidden"; tooltip.style.display = "block";
  tooltip.textContent = "query 0 \u2192 key 0: 0.0000";
  void tooltip.offsetHeight;
  tooltip.style.display = "none"; tooltip.style.visibility = "";
  root.dataset.ready = "true";
}
