/* attnscope serve: the form posts each text to /api/capture and draws the answer with the
 * static page's own renderer (page.js). Text from the server is set with textContent only. */
(function () {
  "use strict";
  var count = 0;
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function token() {  // the access token of the URL, if any, sent as a header as well
    return new URLSearchParams(window.location.search).get("token");
  }
  function ask(fields) {
    var headers = { "Content-Type": "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    return fetch("api/capture", {
      method: "POST", headers: headers, body: JSON.stringify(fields), credentials: "same-origin"
    }).then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok) throw new Error(body.error || ("HTTP " + response.status));
        return body;
      });
    });
  }
  function show(column, answer) {
    column.textContent = "";
    if (answer.generated && answer.generated.length) {
      column.appendChild(el("p", "attnscope-generated", "Generated: " + answer.generated.join(" ")));
    }
    var root = el("div", "attnscope-root");
    root.id = "attnscope-live-" + (count++);
    column.appendChild(root);
    attnscopeRender(root.id, answer);
  }
  function start() {
    var form = document.getElementById("attnscope-form");
    var status = document.getElementById("attnscope-status");
    var results = document.getElementById("attnscope-results");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var value = function (name) { var n = form.elements[name]; return n ? n.value : ""; };
      var base = { text: value("text") };
      if (value("text_pair").trim()) base.text_pair = value("text_pair");
      if (value("target").trim()) base.target = value("target");
      if (Number(value("generate")) > 0) base.generate = Number(value("generate"));
      var texts = [base];
      if (value("compare").trim()) {
        var other = Object.assign({}, base);
        other.text = value("compare");
        texts.push(other);
      }
      status.textContent = "Capturing\u2026";
      delete document.body.dataset.done;
      results.textContent = "";
      results.classList.toggle("attnscope-compare", texts.length > 1);
      var columns = texts.map(function () {
        var column = el("section", "attnscope-result");
        results.appendChild(column);
        return column;
      });
      Promise.all(texts.map(ask)).then(function (answers) {
        answers.forEach(function (answer, i) { show(columns[i], answer); });
        status.textContent = "";
      }).catch(function (failure) {
        results.textContent = "";
        status.textContent = "Error: " + failure.message;
      }).then(function () { document.body.dataset.done = String(Date.now()); });
    });
    document.body.dataset.ready = "true";
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
