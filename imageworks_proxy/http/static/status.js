// The status page: polls GET v1/status every couple of seconds and redraws from it.
// Every string from the proxy reaches the DOM through textContent or setAttribute, never as HTML:
// model names come from the registry. Requests go to this page's own origin only, with JSON bodies and
// no cookies; an API key, when the proxy needs one, is sent as a Bearer header and kept in this tab only.
"use strict";

(() => {
  const POLL_MS = 2000;
  const KEY_STORE = "imageworks-proxy-api-key";
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let timer = null;
  let busy = false; // an admin action is running
  let needKey = false; // v1/status answered 401: wait for a key before polling again

  // -- small DOM helpers ------------------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "className") node.className = value;
      else if (name === "onclick") node.addEventListener("click", value);
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(tbodyParent, rows) {
    const tbody = tbodyParent.querySelector("tbody");
    tbody.replaceChildren(...rows);
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    return node;
  }

  // -- formatting -------------------------------------------------------------------------------
  function ms(value) {
    if (value === null || value === undefined) return "—";
    return value >= 10000 ? (value / 1000).toFixed(1) + " s" : Math.round(value) + " ms";
  }

  function seconds(value) {
    return value === null || value === undefined ? "—" : value.toFixed(value < 10 ? 2 : 1) + " s";
  }

  function ago(ts, now) {
    const s = Math.max(0, Math.round(now - ts));
    if (s < 60) return s + " s ago";
    if (s < 3600) return Math.round(s / 60) + " min ago";
    return new Date(ts * 1000).toLocaleTimeString();
  }

  function timeCell(ts, now) {
    return el("td", { className: "when", title: new Date(ts * 1000).toLocaleString() }, ago(ts, now));
  }

  function statePill(state) {
    if (state === null || state === undefined) {
      return el("span", { className: "pill state-none", title: "the backend loads it when asked; the proxy does not manage it" },
        "on demand");
    }
    return el("span", { className: "pill state-" + state }, state);
  }

  // -- talking to the proxy ---------------------------------------------------------------------
  function headers(json) {
    const h = { Accept: "application/json" };
    if (json) h["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function sameOrigin(path) {
    const url = new URL(path, document.baseURI);
    return url.origin === window.location.origin ? url : null;
  }

  async function errorText(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return String(body.error.message);
    } catch (_) { /* not JSON */ }
    return "HTTP " + resp.status;
  }

  function say(text, kind) {
    const box = $("message");
    box.hidden = !text;
    box.className = "message " + (kind || "");
    box.textContent = text || "";
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const resp = await fetch(sameOrigin("v1/status"), { headers: headers(false), credentials: "omit" });
      if (resp.status === 401) {
        needKey = true;
        askForKey("The proxy needs an API key (one of CHAT_PROXY_API_KEYS).");
        connection("API key needed", "bad");
        return; // the key form polls again
      }
      if (!resp.ok) throw new Error(await errorText(resp));
      needKey = false;
      render(await resp.json());
      connection("live", "good");
    } catch (err) {
      connection("offline", "bad");
      document.documentElement.dataset.error = String(err.message || err);
    } finally {
      if (!needKey) timer = setTimeout(poll, document.hidden ? POLL_MS * 5 : POLL_MS);
    }
  }

  function askForKey(why) {
    $("key-why").textContent = why;
    $("key-card").hidden = false;
  }

  async function act(button, path, body, doing) {
    const url = sameOrigin(path);
    if (!url || busy) return;
    busy = true;
    button.disabled = true;
    say(doing + "…", "");
    try {
      const resp = await fetch(url, {
        method: "POST", headers: headers(true), body: JSON.stringify(body), credentials: "omit",
      });
      say(resp.ok ? doing + ": done." : doing + " failed: " + (await errorText(resp)), resp.ok ? "good" : "bad");
      if (resp.status === 401 || resp.status === 403) askForKey("Activate and Stop may need a key that allows them.");
    } catch (err) {
      say(doing + " failed: " + String(err.message || err), "bad");
    } finally {
      busy = false;
      poll();
    }
  }

  function connection(text, kind) {
    const pill = $("connection");
    pill.textContent = text;
    pill.className = "pill conn-" + kind;
  }

  // -- sections ---------------------------------------------------------------------------------
  function renderModels(status) {
    const rows = status.models.map((m) => {
      const name = el("td", { className: "name" }, el("span", { className: "model-id" }, m.id));
      if (m.active) name.append(" ", el("span", { className: "pill active", title: "the active GPU tenant" }, "active"));
      if (m.logical_id && m.logical_id !== m.id) name.append(el("div", { className: "muted small" }, m.logical_id));
      const caps = [...m.modalities.filter((x) => x !== "text"), ...m.capabilities];
      const action = el("td");
      if (m.activate && !(m.active && m.state === "loaded")) {
        action.append(el("button", {
          type: "button",
          onclick: (ev) => act(ev.currentTarget, m.activate, { model: m.logical_id }, "Activating " + m.id),
        }, "Activate"));
      }
      return el("tr", { "data-model": m.id, "data-state": m.state === null ? "" : m.state, "data-active": m.active },
        name,
        el("td", {}, m.backend || "—", m.adapter && m.adapter !== m.backend ? el("div", { className: "muted small" }, m.adapter) : null),
        el("td", { className: "wide" }, caps.length ? caps.join(", ") : "—"),
        el("td", {}, statePill(m.state)),
        action);
    });
    fill($("models"), rows);
    $("models-count").textContent = "(" + status.models.length + ")";
  }

  function renderGpu(status) {
    const gpu = status.gpu;
    const active = gpu.active;
    $("gpu-active").textContent = active ? (active.model || active.label || active.key) : "none";
    $("gpu-active").title = active ? active.key : "";
    $("gpu-phase").textContent = gpu.phase;
    $("gpu-inflight").textContent = String(gpu.inflight);
    $("gpu-queue").textContent = gpu.queue_depth ? gpu.queue_depth + " request(s)" : "nobody";
    // CHAT_PROXY_VLLM_IDLE_UNLOAD_S / _OLLAMA_IDLE_UNLOAD_S: when the idle active model will be stopped
    const idle = gpu.idle_unload_in_s;
    $("gpu-idle").textContent = idle === null || idle === undefined ? "not pending" : "in " + Math.ceil(idle) + " s";
    $("gpu-devices").replaceChildren(...(gpu.devices.length ? [] : [el("li", { className: "muted" }, "No GPU seen (NVML)")]),
      ...gpu.devices.map((d) => {
      const used = d.memory_used_bytes / d.memory_total_bytes;
      return el("li", {}, d.name + " · " + (d.memory_used_bytes / 2 ** 30).toFixed(1) + " / " +
        (d.memory_total_bytes / 2 ** 30).toFixed(1) + " GiB",
        el("div", { className: "bar", title: Math.round(used * 100) + " % used" },
          el("span", { "data-fill": Math.round(used * 100) })));
    }));
    for (const fillEl of $("gpu-devices").querySelectorAll("[data-fill]")) {
      fillEl.style.width = fillEl.dataset.fill + "%"; // a style property, not an inline style attribute (CSP)
    }
    $("adapters").replaceChildren(...status.adapters.map((a) => {
      const st = a.state || {};
      const line = el("p", { className: "adapter", "data-adapter": a.name },
        el("strong", {}, a.name), ": ", statePill(st.state === undefined ? null : st.state),
        st.active ? " " + st.active : "");
      if (st.last_error) line.append(el("div", { className: "small bad-text" }, String(st.last_error)));
      if (a.stop && st.state && st.state !== "stopped") {
        line.append(" ", el("button", {
          type: "button", onclick: (ev) => act(ev.currentTarget, a.stop, {}, "Stopping " + a.name),
        }, "Stop"));
      }
      return line;
    }));
  }

  function renderRequests(status) {
    const now = status.time;
    const listed = new Map(status.models.map((m) => [m.logical_id, m.id])); // show the names clients use
    fill($("requests"), status.requests.map((r) => {
      const ok = r.status < 400 && !r.error_code;
      const tokens = r.prompt_tokens === null && r.completion_tokens === null ? "—"
        : (r.prompt_tokens ?? "—") + " / " + (r.completion_tokens ?? "—") + (r.tokens_estimated ? " ≈" : "");
      return el("tr", { "data-request-id": r.request_id },
        timeCell(r.ts, now),
        el("td", { title: r.model || "" }, listed.get(r.model) || r.model || "—", r.stream ? el("span", { className: "muted small" }, " stream") : null),
        el("td", { title: r.error_code || "" }, el("span", { className: "pill " + (ok ? "ok" : "err") },
          String(r.status)), r.error_code ? " " + r.error_code : ""),
        el("td", { className: "num", title: r.queue_ms ? "waited " + ms(r.queue_ms) + " for a switch" : "" },
          ms(r.duration_ms)),
        el("td", { className: "num wide" }, ms(r.ttft_ms)),
        el("td", { className: "num" }, tokens));
    }));
    $("requests-empty").hidden = status.requests.length > 0;
  }

  function renderSwitches(status) {
    const now = status.time;
    fill($("switches"), status.switches.map((s) => {
      const kind = s.kind && s.kind !== "cold" ? " · " + s.kind : ""; // e.g. a sleeping model woken
      const result = s.event === "vacate" ? "stopped" : s.ok ? "ok" + kind : "failed" + (s.error ? ": " + s.error : "");
      const parts = [s.drain_s, s.stop_s, s.start_s].map((x) => (x === undefined ? "—" : seconds(x)));
      return el("tr", {},
        timeCell(s.at, now),
        el("td", {}, s.from || "—"),
        el("td", {}, s.to || "—"),
        el("td", {}, el("span", { className: "pill " + (s.ok === false ? "err" : "ok") }, result)),
        el("td", { className: "num" }, seconds(s.total_s)),
        el("td", { className: "num wide" }, parts.join(" / ")));
    }));
    $("switches-empty").hidden = status.switches.length > 0;
  }

  // -- charts: one small inline SVG per series ----------------------------------------------------
  function chart(title, unit, points, series) {
    const W = 300, H = 90, PAD = 4;
    const values = series.flatMap((s) => points.map(s.value)).filter((v) => v !== null && v !== undefined);
    const max = Math.max(...values, 0) || 1;
    const step = points.length > 1 ? (W - 2 * PAD) / (points.length - 1) : 0;
    const box = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "chart" });
    box.append(svg("line", { x1: PAD, x2: W - PAD, y1: H - PAD, y2: H - PAD, class: "axis" }));
    for (const s of series) {
      let d = "", drawing = false; // a gap (no value) lifts the pen
      points.forEach((p, i) => {
        const v = s.value(p);
        drawing = drawing && v !== null && v !== undefined;
        if (v === null || v === undefined) return;
        const x = PAD + i * step, y = H - PAD - (v / max) * (H - 2 * PAD);
        d += (drawing ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
        drawing = true;
      });
      if (d) box.append(svg("path", { d, class: "line " + s.cls }));
      points.forEach((p, i) => { // a value with no neighbour to join would not show as a line
        const v = s.value(p);
        const alone = (j) => j < 0 || j >= points.length || s.value(points[j]) === null;
        if (v !== null && alone(i - 1) && alone(i + 1)) {
          box.append(svg("circle", { cx: PAD + i * step, cy: H - PAD - (v / max) * (H - 2 * PAD), r: 2, class: "dot " + s.cls }));
        }
      });
    }
    // the legend gives the figure for the whole window
    const legend = series.map((s) => el("span", { className: "key " + s.cls },
      s.label + " " + (s.window === null || s.window === undefined ? "—" : fmt(s.window))));
    return el("figure", { className: "chart-box" },
      el("figcaption", {}, title,
        el("span", { className: "muted" }, values.length ? " max " + fmt(max) + " " + unit : " no data yet")),
      box, el("div", { className: "legend" }, ...legend));
  }

  function fmt(v) {
    return v >= 100 ? Math.round(v).toString() : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  }

  function renderMetrics(status) {
    const m = status.metrics;
    $("metrics-off").hidden = Boolean(m);
    if (!m) {
      $("charts").replaceChildren();
      $("metrics-window").textContent = "";
      return;
    }
    const o = m.overall;
    $("metrics-window").textContent = "(last " + Math.round(m.window_s) + " s: " + o.requests + " requests, " +
      o.errors + " errors, " + m.in_flight + " in flight)";
    const pts = m.points;
    const lat = (q) => (p) => (p.latency_ms ? p.latency_ms[q] : null);
    const latWindow = (q) => (o.latency_ms ? o.latency_ms[q] : null);
    $("charts").replaceChildren(
      chart("Requests", "/s", pts, [
        { label: "req/s", cls: "s1", value: (p) => p.requests_per_s, window: o.requests_per_s },
      ]),
      chart("Latency", "ms", pts, ["p50", "p95", "p99"].map((q, i) => (
        { label: q, cls: "s" + (i + 1), value: lat(q), window: latWindow(q) }))),
      chart("Generation speed", "tokens/s", pts, [
        { label: "tok/s", cls: "s1", value: (p) => p.tokens_per_s, window: o.tokens_per_s },
      ]));
  }

  function render(status) {
    $("version").textContent = "v" + status.version;
    if (status.registry && status.registry.error) say("Registry: " + status.registry.error, "bad");
    renderGpu(status);
    renderModels(status);
    renderRequests(status);
    renderSwitches(status);
    renderMetrics(status);
    const root = document.documentElement;
    root.dataset.state = "ready";
    root.dataset.updated = String(status.time);
    delete root.dataset.error;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const key = $("key-input").value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      $("key-input").value = "";
      $("key-card").hidden = true;
      needKey = false;
      poll();
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });
    poll();
  });
})();
