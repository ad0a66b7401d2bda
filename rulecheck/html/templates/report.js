(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("rc-data").textContent);
  var CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
  var BASE = {
    height: 300,
    margin: { l: 60, r: 30, t: 40, b: 50 },
    font: { family: "system-ui, sans-serif", size: 12 },
    paper_bgcolor: "#ffffff",
    plot_bgcolor: "#fafafa"
  };

  function merge(a, b) {
    var out = {};
    Object.keys(a).forEach(function (k) { out[k] = a[k]; });
    Object.keys(b).forEach(function (k) {
      var v = b[k];
      out[k] = (v && typeof v === "object" && !Array.isArray(v) && out[k] && typeof out[k] === "object")
        ? merge(out[k], v) : v;
    });
    return out;
  }

  function draw(el) {
    if (el.dataset.drawn) { return; }
    el.dataset.drawn = "1";
    var fig = DATA.figs[el.dataset.fig];
    if (!fig) { el.textContent = "figure " + el.dataset.fig + " is missing"; return; }
    Plotly.newPlot(el, fig.data, merge(BASE, fig.layout), CONFIG);
  }

  function shown(text) {
    // as the page's Python side shows tokens: breaks and tabs visible, long runs of spaces counted
    return text.replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5")
      .replace(/ {4,}/g, function (m) { return "\u23b5" + m.length; });
  }

  function exemplars(el) {
    if (el.dataset.drawn) { return; }
    el.dataset.drawn = "1";
    var list = DATA.ex[el.dataset.key] || [];
    var max = 0;
    list.forEach(function (x) { x.a.forEach(function (v) { if (v !== null && v > max) { max = v; } }); });
    list.forEach(function (x) {
      var row = document.createElement("div");
      row.className = "exemplar";
      var meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = "sequence " + x.seq + ", t = " + x.pos + ", activation " + x.act;
      row.appendChild(meta);
      var text = document.createElement("span");
      text.className = "toks";
      x.tok.forEach(function (t, i) {
        var s = document.createElement("span");
        var a = x.a[i] === null ? 0 : x.a[i];
        var w = x.w[i];
        s.className = "tok";
        s.textContent = shown(t);
        s.style.backgroundColor = "rgba(255, 127, 14, " + (max > 0 ? Math.max(0, a) / max : 0).toFixed(3) + ")";
        if (w !== null) { s.style.boxShadow = "inset 0 -3px 0 rgba(31, 119, 180, " + w.toFixed(3) + ")"; }
        if (i === x.t) { s.classList.add("query"); }
        if (i > x.t) { s.classList.add("after"); }
        if (x.keys.indexOf(i) >= 0) {
          s.classList.add("key");
          var sup = document.createElement("sup");
          sup.textContent = w === null ? "" : w.toFixed(2);
          s.appendChild(sup);
        }
        s.title = "activation " + a + (w === null ? "" : ", attention from the query " + w);
        text.appendChild(s);
      });
      row.appendChild(text);
      var match = document.createElement("span");
      match.className = "match";
      match.textContent = x.term ? "matches " + x.term : "no term of the rule matches at the query";
      row.appendChild(match);
      el.appendChild(row);
    });
  }

  function openCard(card) {
    card.querySelectorAll(".exemplars").forEach(exemplars);
    card.querySelectorAll(".plot[data-fig]").forEach(draw);
  }

  document.querySelectorAll(".plot[data-fig]").forEach(function (el) {
    if (!el.closest("details.card")) { draw(el); }
  });
  document.querySelectorAll("details.card").forEach(function (card) {
    card.addEventListener("toggle", function () { if (card.open) { openCard(card); } });
  });

  document.querySelectorAll("section.head").forEach(function (section) {
    var input = section.querySelector(".search input");
    var count = section.querySelector(".search .count");
    var cards = Array.prototype.slice.call(section.querySelectorAll("details.card"));
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shownCards = 0;
      cards.forEach(function (card) {
        var text = card.dataset.search;
        var hit = words.every(function (w) { return text.indexOf(w) >= 0; });
        card.hidden = !hit;
        if (hit) { shownCards += 1; }
      });
      count.textContent = shownCards + " of " + cards.length + " features";
    });
  });

  function follow() {
    var id = decodeURIComponent(window.location.hash.slice(1));
    var target = id && document.getElementById(id);
    if (target && target.tagName === "DETAILS") {
      target.hidden = false;
      target.open = true;
      openCard(target);
      target.scrollIntoView();
    }
  }
  window.addEventListener("hashchange", follow);
  follow();
})();
