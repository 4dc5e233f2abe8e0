/* latentaudit report: sort tables, open a latent's details from the address, select a node of the
   circuit graph. #sort=KEY (the column's natural order) or #sort=KEY:asc / :desc sorts the
   ranked-latents table, also as ?sort=...; #latent-ID opens and shows that latent; #cnode-L-ID
   selects a circuit node (its edges stand out, its panel opens). No request leaves the page. */
(function () {
  "use strict";
  var root = document.documentElement;
  window.addEventListener("error", function () {
    root.setAttribute("data-errors", String(Number(root.getAttribute("data-errors") || 0) + 1));
  });

  function columnOf(table, key) {
    var heads = table.tHead ? table.tHead.rows[0].cells : [];
    for (var i = 0; i < heads.length; i++) {
      if (heads[i].getAttribute("data-key") === key) { return i; }
    }
    return -1;
  }

  function compare(x, y, numeric) {
    if (numeric) { return parseFloat(x) - parseFloat(y); }
    return x.localeCompare(y);
  }

  function sortTable(table, key, dir) {
    var col = columnOf(table, key);
    if (col < 0) { return false; }
    var head = table.tHead.rows[0].cells[col];
    var kind = head.getAttribute("data-kind");
    var numeric = kind !== "text" && kind !== "tokens";
    dir = dir === "asc" || dir === "desc" ? dir : head.getAttribute("data-first") || "asc";
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-v") || "";
      var y = b.cells[col].getAttribute("data-v") || "";
      if (x === "" || y === "") {
        if (x !== y) { return x === "" ? 1 : -1; }
      } else {
        var c = compare(x, y, numeric);
        if (c !== 0) { return dir === "asc" ? c : -c; }
      }
      return Number(a.getAttribute("data-i")) - Number(b.getAttribute("data-i"));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.removeAttribute("aria-sort");
    });
    head.setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    table.setAttribute("data-sort-key", key);
    table.setAttribute("data-sort-dir", dir);
    return true;
  }

  function openLatent(id) {
    var el = document.getElementById(id);
    if (!el || el.tagName !== "DETAILS") { return false; }
    el.open = true;
    el.scrollIntoView();
    return true;
  }

  function each(list, fn) { Array.prototype.forEach.call(list, fn); }

  function selectNode(id) {
    var svg = document.getElementById("circuit-svg");
    var node = document.getElementById(id);
    if (!svg || !node || !node.classList || !node.classList.contains("cnode")) { return false; }
    var near = {};
    each(svg.querySelectorAll(".cedge"), function (p) {
      var src = p.getAttribute("data-source"), dst = p.getAttribute("data-target");
      var on = src === id || dst === id;
      p.classList.toggle("on", on);
      if (on) { near[src === id ? dst : src] = true; }
    });
    each(svg.querySelectorAll(".cnode"), function (g) {
      g.classList.toggle("on", g.id === id);
      g.classList.toggle("near", near[g.id] === true);
    });
    svg.classList.add("focus");
    each(document.querySelectorAll(".cpanel"), function (d) { d.hidden = d.id !== "panel-" + id; });
    root.setAttribute("data-cnode", id);
    return true;
  }

  function applyAddress() {
    var parts = (location.search.slice(1) + "&" + location.hash.slice(1)).split("&");
    var table = document.getElementById("ranking");
    parts.forEach(function (part) {
      try { part = decodeURIComponent(part); } catch (e) { return; }
      if (part.indexOf("latent-") === 0) {
        openLatent(part);
      } else if (part.indexOf("cnode-") === 0) {
        selectNode(part);
      } else if (part.indexOf("sort=") === 0 && table) {
        var spec = part.slice(5).split(":");
        sortTable(table, spec[0], spec[1]);
      }
    });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      var button = th.querySelector("button");
      if (!button) { return; }
      button.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        var dir = th.getAttribute("data-first") || "asc";
        if (table.getAttribute("data-sort-key") === key) {
          dir = table.getAttribute("data-sort-dir") === "asc" ? "desc" : "asc";
        }
        sortTable(table, key, dir);
      });
    });
  });
  Array.prototype.forEach.call(document.querySelectorAll("button[data-action]"), function (b) {
    b.addEventListener("click", function () {
      var open = b.getAttribute("data-action") === "open-all";
      Array.prototype.forEach.call(document.querySelectorAll("details.latent"), function (d) {
        d.open = open;
      });
    });
  });
  document.addEventListener("click", function (e) {
    var link = e.target.closest ? e.target.closest("a[href^='#latent-']") : null;
    if (link) { openLatent(link.getAttribute("href").slice(1)); }
    var to = e.target.closest ? e.target.closest("a[href^='#cnode-']") : null;
    if (to) { selectNode(to.getAttribute("href").slice(1)); }
    var node = e.target.closest ? e.target.closest("#circuit-svg .cnode") : null;
    if (node) { selectNode(node.id); }
  });
  document.addEventListener("keydown", function (e) {
    var node = e.target.closest ? e.target.closest("#circuit-svg .cnode") : null;
    if (node && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); selectNode(node.id); }
  });
  var slider = document.getElementById("circuit-min");
  if (slider) {
    slider.addEventListener("input", function () {
      var min = Number(slider.value);
      var shown = document.getElementById("circuit-min-value");
      if (shown) { shown.textContent = String(min); }
      each(document.querySelectorAll("#circuit-svg .cedge"), function (p) {
        p.classList.toggle("weak", Number(p.getAttribute("data-s")) < min);
      });
    });
  }
  window.addEventListener("hashchange", applyAddress);
  applyAddress();
  root.setAttribute("data-ready", "1");
}());
