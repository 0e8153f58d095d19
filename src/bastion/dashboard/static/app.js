// Bastion's dashboard: the login page and the operations page. Plain JavaScript, no framework.
// Every value from the server is written with textContent (never innerHTML): key names, incident
// details and metric labels come from elsewhere and are shown as text, not read as markup.
"use strict";

(function () {
  const POLL_MS = 3000;
  const INCIDENT_ID = /^[1-9][0-9]{0,11}$/;
  const KEY_ID = /^(?:[0-9a-f]{16}|cert:[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$/; // a key, or a service identity
  const MODEL_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

  function el(tag, options, children) {
    const node = document.createElement(tag);
    const o = options || {};
    if (o.text !== undefined && o.text !== null) node.textContent = String(o.text);
    if (o.className) node.className = o.className;
    if (o.title) node.title = String(o.title);
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function replace(id, ...nodes) {
    const target = document.getElementById(id);
    target.replaceChildren(...nodes);
  }

  function fmtTime(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  function fmtMs(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const ms = seconds * 1000;
    return (ms < 10 ? ms.toFixed(2) : ms.toFixed(1)) + " ms";
  }

  function fmtNumber(value, digits) {
    if (value === null || value === undefined) return "—";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return value.toLocaleString("en");
    return value.toFixed(digits === undefined ? 3 : digits);
  }

  function figure(label, value, className) {
    return el("div", { className: "figure" + (className ? " " + className : "") }, [
      el("div", { className: "value", text: value }),
      el("div", { className: "label", text: label }),
    ]);
  }

  function empty(text) {
    return el("p", { className: "empty", text: text });
  }

  // columns: [[heading, function(row) -> string | Node]]
  function table(columns, rows, emptyText) {
    if (!rows || rows.length === 0) return empty(emptyText || "None.");
    const head = el("tr", {}, columns.map(([heading]) => el("th", { text: heading })));
    const body = rows.map((row) =>
      el(
        "tr",
        {},
        columns.map(([, cell]) => {
          const value = cell(row);
          return value instanceof Node ? el("td", {}, [value]) : el("td", { text: value });
        }),
      ),
    );
    return el("table", {}, [el("thead", {}, [head]), el("tbody", {}, body)]);
  }

  // ---------------------------------------------------------------- login page

  function initLogin() {
    const form = document.getElementById("login-form");
    const input = document.getElementById("api-key");
    const message = document.getElementById("login-message");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = input.value.trim();
      input.value = "";
      message.textContent = "Signing in…";
      message.className = "message";
      let response;
      try {
        response = await fetch("/v2/admin/session", {
          method: "POST",
          credentials: "same-origin",
          headers: { Authorization: "Bearer " + key, "Content-Type": "application/json" },
          body: "{}",
        });
      } catch (error) {
        message.textContent = "The server did not answer.";
        return;
      }
      if (response.ok) {
        window.location.assign("/dashboard");
        return;
      }
      message.className = "message error";
      message.textContent =
        response.status === 403
          ? "Refused: this key is not granted the admin role (or is quarantined)."
          : response.status === 429
            ? "Too many attempts: wait and try again."
            : "Refused: missing or invalid credentials.";
    });
  }

  // ---------------------------------------------------------------- dashboard page

  function initDashboard() {
    const meta = document.querySelector('meta[name="bastion-csrf"]');
    const csrf = meta ? meta.getAttribute("content") : "";
    let previous = null; // the summary the rates are measured from
    let rates = null;
    let timer = null;

    function say(text, kind) {
      const node = document.getElementById("message");
      node.textContent = text;
      node.className = "message" + (kind ? " " + kind : "");
    }

    async function post(path, body) {
      const response = await fetch(path, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body || {}),
      });
      let doc = {};
      try {
        doc = await response.json();
      } catch (error) {
        doc = {};
      }
      return { ok: response.ok, status: response.status, doc: doc };
    }

    function ended(status) {
      if (timer !== null) clearInterval(timer);
      const link = el("a", { text: "Sign in again" });
      link.href = "/dashboard/login";
      const node = document.getElementById("message");
      node.className = "message error";
      node.replaceChildren(
        document.createTextNode(
          status === 401 ? "The session has ended (expired, signed out, or its key revoked or quarantined). " : "Not permitted. ",
        ),
        link,
      );
    }

    async function act(label, path, body) {
      say(label + "…");
      const result = await post(path, body);
      if (result.status === 401) return ended(401);
      if (result.ok) say(label + ": done.", "ok");
      else say(label + ": refused (" + result.status + " " + (result.doc.code || "") + ").", "error");
      await poll();
    }

    function actionButton(text, label, path, body, className) {
      const button = el("button", { text: text, className: className || "" });
      button.type = "button";
      button.addEventListener("click", () => {
        button.disabled = true;
        act(label, path, body);
      });
      return button;
    }

    function renderTraffic(s) {
      const t = s.traffic;
      let allowedRate = "—";
      let deniedRate = "—";
      // Rates over at least two seconds: a poll right after an action would make a spike of a few requests.
      if (previous && s.generated_at - previous.generated_at >= 2) {
        const dt = s.generated_at - previous.generated_at;
        rates = [((t.allowed - previous.traffic.allowed) / dt).toFixed(1) + "/s", ((t.denied - previous.traffic.denied) / dt).toFixed(1) + "/s"];
        previous = s;
      } else if (!previous) {
        previous = s;
      }
      if (rates) [allowedRate, deniedRate] = rates;
      replace(
        "traffic-figures",
        figure("allowed now", allowedRate),
        figure("denied now", deniedRate, "bad"),
        figure("requests since start", fmtNumber(t.requests)),
        figure("denied since start", fmtNumber(t.denied), t.denied > 0 ? "bad" : ""),
      );
      replace(
        "traffic-routes",
        table(
          [
            ["route", (r) => r.route],
            ["allowed", (r) => fmtNumber(r.allowed)],
            ["denied", (r) => fmtNumber(r.denied)],
          ],
          t.by_route,
          "No requests yet.",
        ),
      );
    }

    function renderDenials(s) {
      const d = s.denials;
      replace(
        "denials",
        el("h3", { text: "By status" }),
        table(
          [
            ["status", (r) => r.status],
            ["count", (r) => fmtNumber(r.count)],
          ],
          d.by_status,
          "No denials.",
        ),
        el("h3", { text: "By reason (stable code)" }),
        table(
          [
            ["code", (r) => r.code],
            ["count", (r) => fmtNumber(r.count)],
          ],
          d.by_code,
          "No denials.",
        ),
        el("h3", { text: "Authentication failures" }),
        table(
          [
            ["reason", (r) => r.reason],
            ["count", (r) => fmtNumber(r.count)],
          ],
          d.authentication,
          "None.",
        ),
        el("h3", { text: "Rate limits and quotas" }),
        table(
          [
            ["code", (r) => r.code],
            ["count", (r) => fmtNumber(r.count)],
          ],
          d.rate_limited,
          "None.",
        ),
        el("h3", { text: "Containment (query auditing)" }),
        table(
          [
            ["model", (r) => r.model],
            ["signal", (r) => r.signal],
            ["action", (r) => r.action],
            ["count", (r) => fmtNumber(r.count)],
          ],
          d.containment,
          "None.",
        ),
      );
    }

    function renderLatency(s) {
      const l = s.latency;
      replace("latency-figures", figure("p50", fmtMs(l.p50)), figure("p90", fmtMs(l.p90)), figure("p99", fmtMs(l.p99)));
      replace(
        "latency-routes",
        table(
          [
            ["route", (r) => r.route],
            ["requests", (r) => fmtNumber(r.count)],
            ["p50 ms", (r) => fmtMs(r.p50).replace(" ms", "")],
            ["p90 ms", (r) => fmtMs(r.p90).replace(" ms", "")],
            ["p99 ms", (r) => fmtMs(r.p99).replace(" ms", "")],
          ],
          l.by_route,
          "No requests yet.",
        ),
      );
    }

    function renderIncidents(s) {
      const counts = s.incidents.counts;
      replace(
        "incident-counts",
        ...Object.keys(counts).map((state) =>
          figure(state, fmtNumber(counts[state]), counts[state] > 0 && state !== "closed" && state !== "remediated" ? "bad" : ""),
        ),
      );
      replace(
        "incidents",
        table(
          [
            ["#", (i) => String(i.id)],
            ["opened", (i) => fmtTime(i.opened_at)],
            ["kind", (i) => i.kind],
            ["model", (i) => i.model],
            ["principal", (i) => i.principal || "—"],
            ["containment", (i) => i.action],
            ["state", (i) => el("span", { className: "state state-" + String(i.state).replace(/[^a-z]/g, ""), text: i.state })],
            ["detail", (i) => el("span", { className: "detail", text: i.detail, title: i.detail })],
            [
              "actions",
              (i) => {
                const id = String(i.id);
                const box = el("div", { className: "actions" });
                if (!INCIDENT_ID.test(id)) return box;
                const path = "/v2/admin/incidents/" + encodeURIComponent(id) + "/transition";
                if (i.state === "open" || i.state === "contained") {
                  box.appendChild(
                    actionButton("Acknowledge", "Acknowledge incident " + id, path, { state: "investigating", note: "acknowledged from the dashboard" }),
                  );
                }
                box.appendChild(
                  actionButton("Resolve", "Resolve incident " + id, path, { state: "remediated", note: "resolved from the dashboard" }, "secondary"),
                );
                return box;
              },
            ],
          ],
          s.incidents.unresolved,
          "No unresolved incidents.",
        ),
        ...(s.incidents.unresolved_total > s.incidents.unresolved.length
          ? [
              el("p", {
                className: "muted small",
                text:
                  "Showing the newest " +
                  s.incidents.unresolved.length +
                  " of " +
                  s.incidents.unresolved_total +
                  " unresolved incidents (the newest of each state): bastion incidents list --state STATE shows them all.",
              }),
            ]
          : []),
      );
    }

    function renderKeys(s) {
      replace(
        "quarantined",
        table(
          [
            ["key id", (k) => k.key_id],
            ["name", (k) => k.name],
            ["roles", (k) => (k.roles || []).join(", ")],
            ["quarantined", (k) => fmtTime(k.quarantined_at)],
            [
              "actions",
              (k) =>
                KEY_ID.test(String(k.key_id))
                  ? actionButton("Release", "Release key " + k.key_id, "/v2/admin/keys/" + encodeURIComponent(k.key_id) + "/release", {})
                  : el("span"),
            ],
          ],
          s.quarantined_keys,
          "No key is quarantined.",
        ),
        el("h3", { text: "Throttled, degraded or rerouted (the containment ladder)" }),
        table(
          [
            ["principal", (c) => c.principal],
            ["model", (c) => c.model],
            ["step", (c) => c.step + (c.value ? " (" + c.value + ")" : "")],
            ["until", (c) => fmtTime(c.until)],
            [
              "actions",
              (c) => {
                const id = String(c.principal).replace(/^key:/, "");
                return KEY_ID.test(id)
                  ? actionButton("Release", "Release key " + id, "/v2/admin/keys/" + encodeURIComponent(id) + "/release", {})
                  : el("span");
              },
            ],
          ],
          s.contained || [],
          "No key is throttled, degraded or rerouted.",
        ),
      );
    }

    function renderModels(s) {
      const m = s.models;
      replace(
        "models",
        table(
          [
            ["model", (r) => r.name],
            ["version", (r) => r.version],
            ["runtime", (r) => r.runtime],
            ["digest", (r) => el("code", { text: String(r.digest).slice(0, 19) + "…", title: r.digest })],
            [
              "state",
              (r) => {
                if (!r.isolated) return "serving";
                const box = el("div", { className: "actions" }, [el("span", { className: "state state-contained", text: "isolated" })]);
                if (MODEL_NAME.test(String(r.name))) {
                  const path = "/v2/admin/models/" + encodeURIComponent(String(r.name)) + "/release";
                  box.appendChild(actionButton("Release", "Release model " + r.name, path, {}));
                }
                return box;
              },
            ],
          ],
          m.served,
          "No model is served.",
        ),
      );
      replace(
        "rollouts",
        el("h3", { text: "Canary rollouts" }),
        table(
          [
            ["model", (r) => r.model],
            ["stable", (r) => r.stable],
            ["canary", (r) => r.canary || "—"],
            [
              "canary weight",
              (r) => {
                const meter = el("meter");
                meter.min = 0;
                meter.max = 1;
                meter.value = Number(r.weight) || 0;
                return el("span", {}, [meter, el("span", { className: "small", text: " " + Math.round((Number(r.weight) || 0) * 100) + "%" })]);
              },
            ],
            ["status", (r) => r.status],
            ["reason", (r) => r.reason || "—"],
          ],
          m.rollouts,
          "No rollout is configured.",
        ),
      );
    }

    function renderRoles(s) {
      const rows = [];
      for (const role of s.roles) {
        const privacy = role.privacy.length
          ? role.privacy.map((p) => p.model + ": " + fmtNumber(p.spent) + " " + p.unit + " spent by " + p.keys + " key(s), " + fmtNumber(p.budget_per_key) + " each").join("; ")
          : "—";
        rows.push({ role: role, privacy: privacy });
      }
      replace(
        "roles",
        table(
          [
            ["role", (r) => r.role.role],
            ["keys", (r) => fmtNumber(r.role.keys)],
            ["rate /s", (r) => fmtNumber(r.role.rate, 1)],
            ["burst", (r) => fmtNumber(r.role.burst)],
            ["daily quota", (r) => fmtNumber(r.role.daily_quota)],
            ["privacy budgets", (r) => el("span", { className: "wrap", text: r.privacy })],
          ],
          rows,
          "No role.",
        ),
        el("p", {
          className: "muted small",
          text: "Daily quota use is not shown: the state store has no query that reads it without spending.",
        }),
        table(
          [
            ["model", (r) => r.model],
            ["unit", (r) => r.unit],
            ["global budget remaining", (r) => fmtNumber(r.remaining)],
          ],
          s.privacy_global,
          "No global privacy budget is in use.",
        ),
      );
    }

    function renderDrift(s) {
      const d = s.drift;
      if (!d.metrics.length) {
        replace("drift", empty("Drift detection is not part of this server yet: no bastion_drift_* metric is registered. This panel fills when it is."));
        return;
      }
      if (!d.features.length && !d.models.length) {
        replace("drift", empty("Drift metrics are registered (" + d.metrics.join(", ") + ") but no window has been measured yet."));
        return;
      }
      const featureColumns = Array.from(new Set(d.features.flatMap((r) => Object.keys(r.values)))).sort();
      const modelColumns = Array.from(new Set(d.models.flatMap((r) => Object.keys(r.values)))).sort();
      replace(
        "drift",
        table(
          [
            ["model", (r) => r.model],
            ["version", (r) => r.version],
            ["feature", (r) => r.feature],
            ...featureColumns.map((c) => [c, (r) => fmtNumber(r.values[c], 4)]),
          ],
          d.features,
          "No feature measured yet.",
        ),
        el("h3", { text: "Per model" }),
        table(
          [["model", (r) => r.model], ["version", (r) => r.version], ...modelColumns.map((c) => [c, (r) => fmtNumber(r.values[c], 4)])],
          d.models,
          "None.",
        ),
      );
    }

    function renderLlm(s) {
      replace(
        "llm",
        el("h3", { text: "Leakage guard hits" }),
        table(
          [
            ["model", (r) => r.model],
            ["detector", (r) => r.detector],
            ["answers withheld", (r) => fmtNumber(r.count)],
          ],
          s.llm.guard_hits,
          "No answer withheld.",
        ),
        el("h3", { text: "Tokens" }),
        table(
          [
            ["model", (r) => r.model],
            ["kind", (r) => r.kind],
            ["tokens", (r) => fmtNumber(r.count)],
          ],
          s.llm.tokens,
          "No language-model traffic.",
        ),
      );
    }

    async function poll() {
      let response;
      try {
        response = await fetch("/v2/admin/summary", { credentials: "same-origin", headers: { Accept: "application/json" } });
      } catch (error) {
        document.getElementById("updated").textContent = "server unreachable";
        return;
      }
      if (response.status === 401 || response.status === 403) return ended(response.status);
      if (!response.ok) {
        document.getElementById("updated").textContent = "summary failed (" + response.status + ")";
        return;
      }
      const s = await response.json();
      renderTraffic(s);
      renderDenials(s);
      renderLatency(s);
      renderIncidents(s);
      renderKeys(s);
      renderModels(s);
      renderRoles(s);
      renderDrift(s);
      renderLlm(s);
      document.getElementById("updated").textContent = "updated " + fmtTime(s.generated_at);
    }

    document.getElementById("logout").addEventListener("click", async () => {
      await post("/v2/admin/session/logout", {});
      window.location.assign("/dashboard/login");
    });
    poll();
    timer = setInterval(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.page === "login") initLogin();
    else if (document.body.dataset.page === "dashboard") initDashboard();
  });
})();
