// Nephos's dashboard: a page over the REST API and its live event stream. No build step, no
// framework, nothing from a CDN. Every rule is the API's: buttons come from a server's
// `actions` (the operstate table), a create is checked with the API's what-if before it is
// sent, and a refusal is shown as the API's own message.

const TOKEN = "nephos.token";
const $ = (sel) => document.querySelector(sel);
const state = { me: null, flavors: [], servers: new Map(), view: null, stream: null };

// -- DOM -------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 19) : "");

function alertBox(message, kind = "error") {
  const box = $("#alert");
  box.textContent = message;
  box.className = kind === "error" ? "alert" : "alert info";
  box.hidden = !message;
}

// -- the API ---------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN)}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 204) return null;
  const data = await r.json().catch(() => null);
  if (!r.ok) {
    const error = (data && data.error) || { code: String(r.status), message: r.statusText };
    throw new ApiError(r.status, error.code, `${error.code}: ${error.message}`);
  }
  return data;
}

async function all(path) {
  let items = [], cursor = null;
  do {
    const page = await api("GET", path + (path.includes("?") ? "&" : "?") + "limit=500" + (cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""));
    items = items.concat(page.items);
    cursor = page.next_cursor;
  } while (cursor);
  return items;
}

// Run an API call from a button; its refusal is shown as the API's message.
async function attempt(fn, done) {
  alertBox("");
  try {
    const result = await fn();
    if (done) done(result);
    return result;
  } catch (e) {
    alertBox(e.message);
    return undefined;
  }
}

// -- the live stream (fetch, so the token goes in a header, never in a URL) -------------------
async function follow() {
  let last = null;
  const live = $("#live");
  while (sessionStorage.getItem(TOKEN)) {
    const controller = new AbortController();
    state.stream = controller;
    try {
      const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN)}` };
      if (last) headers["Last-Event-ID"] = last;
      const r = await fetch("/api/v1/events/stream" + (state.me.is_admin && !state.me.project_id ? "?all_projects=true" : ""), { headers, signal: controller.signal });
      if (!r.ok) throw new Error(`the event stream answered ${r.status}`);
      live.textContent = "live"; live.className = "live on";
      const reader = r.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const fields = {};
          for (const line of block.split("\n")) {
            if (line.startsWith(":")) continue;
            const i = line.indexOf(":");
            if (i > 0) fields[line.slice(0, i)] = line.slice(i + 1).trim();
          }
          if (fields.id) last = fields.id;
          if (fields.data) onEvent(fields.event, JSON.parse(fields.data));
        }
      }
    } catch (e) {
      if (controller.signal.aborted) return;
    }
    live.textContent = "reconnecting"; live.className = "live";
    await new Promise((ok) => setTimeout(ok, 1500));
  }
}

async function onEvent(kind, data) {
  if (data.server_id && (kind.startsWith("server.") || kind === "job.finished")) {
    try {
      const s = await api("GET", `/api/v1/servers/${data.server_id}`);
      state.servers.set(s.id, s);
    } catch { state.servers.delete(data.server_id); }
  }
  if (state.view && state.view.onEvent) state.view.onEvent(kind, data);
}

// -- pieces ----------------------------------------------------------------------------------
function bar(used, pending, limit, label) {
  const pct = (n) => `${limit > 0 ? Math.min(100, (100 * n) / limit) : 0}%`;
  const over = limit > 0 && used + pending > limit;
  return h("div", {},
    h("div", { class: "bar" + (over ? " over" : ""), role: "img", "aria-label": `${label}: ${used} used, ${pending} pending, of ${limit}` },
      h("span", { class: "pending", style: `width:${pct(used + pending)}` }),
      h("span", { style: `width:${pct(used)}` })),
    h("div", { class: "bar-label" }, `${used} used` + (pending ? ` + ${pending} pending` : "") + ` of ${limit}`));
}

function stateBadge(s) {
  return h("span", {}, h("span", { class: `state ${s.operstate}` }, s.operstate), s.task ? h("span", { class: "task" }, ` ${s.task.toLowerCase()}…`) : null);
}

const SIMPLE = ["release", "start", "stop", "reboot", "suspend", "resume", "destroy"];

function actionButtons(s, after) {
  return s.actions.filter((a) => SIMPLE.includes(a)).map((a) =>
    h("button", {
      type: "button", class: a === "destroy" ? "danger" : "secondary", "data-action": a,
      "aria-label": `${a} ${s.name}`,
      onclick: () => attempt(() => (a === "destroy" ? api("DELETE", `/api/v1/servers/${s.id}`) : api("POST", `/api/v1/servers/${s.id}/actions`, { action: a })), after),
    }, a));
}

// -- views -----------------------------------------------------------------------------------
const views = {
  async servers() {
    const servers = await all("/api/v1/servers" + (state.me.is_admin ? "?all_projects=true" : ""));
    state.servers = new Map(servers.map((s) => [s.id, s]));
    const filter = h("input", { id: "filter", type: "search", placeholder: "name, state or address" });
    const body = h("tbody", {});
    const draw = () => {
      const words = filter.value.trim().toLowerCase();
      body.replaceChildren(...[...state.servers.values()]
        .filter((s) => s.operstate !== "DESTROYED")
        .filter((s) => !words || [s.name, s.operstate, s.flavor, ...s.addresses.map((a) => a.ip)].join(" ").toLowerCase().includes(words))
        .sort((a, b) => a.name.localeCompare(b.name))
        .map((s) => h("tr", { "data-server": s.id, "data-state": s.operstate },
          h("td", {}, h("a", { href: `#/server/${s.id}` }, s.name)),
          h("td", {}, stateBadge(s)),
          h("td", { class: "wide" }, s.flavor),
          h("td", { class: "wide" }, s.addresses.map((a) => a.ip + (a.public_ip ? ` (${a.public_ip})` : "")).join(", ")),
          h("td", { class: "wide" }, when(s.lease_expires_at)),
          h("td", {}, actionButtons(s, draw)))));
    };
    filter.addEventListener("input", draw);
    draw();
    return {
      node: h("section", {},
        h("h1", {}, "Servers"),
        h("p", {}, h("label", { for: "filter" }, "Filter "), filter, " ", h("a", { class: "button", href: "#/create" }, "Create servers")),
        h("div", { class: "table-wrap" }, h("table", {},
          h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "State"), h("th", { class: "wide" }, "Flavor"), h("th", { class: "wide" }, "Addresses"), h("th", { class: "wide" }, "Lease ends"), h("th", {}, "Actions"))),
          body))),
      onEvent: () => draw(),
    };
  },

  async server(id) {
    const card = h("div", {});
    const timeline = h("ol", { class: "timeline", "aria-label": "Events" });
    const draw = async () => {
      const s = await api("GET", `/api/v1/servers/${id}`);
      state.servers.set(s.id, s);
      const extra = [];
      if (s.actions.includes("resize")) {
        const pick = h("select", { id: "resize-flavor", "aria-label": "New flavor" }, state.flavors.filter((f) => f.name !== s.flavor).map((f) => h("option", { value: f.name }, f.name)));
        extra.push(h("span", {}, pick, h("button", { type: "button", class: "secondary", onclick: () => attempt(() => api("POST", `/api/v1/servers/${id}/actions`, { action: "resize", flavor: pick.value }), draw) }, "resize")));
      }
      if (s.actions.includes("save_image")) {
        const named = h("input", { id: "image-name", "aria-label": "New image's name", placeholder: "new image's name" });
        extra.push(h("span", {}, named, h("button", { type: "button", class: "secondary", onclick: () => attempt(() => api("POST", `/api/v1/servers/${id}/actions`, { action: "save_image", image_name: named.value }), draw) }, "save image")));
      }
      if (s.actions.includes("console")) {
        extra.push(h("button", { type: "button", class: "secondary", onclick: () => attempt(() => api("POST", `/api/v1/servers/${id}/actions`, { action: "console" }), (c) => alertBox(`VNC ${c.host}:${c.port}, password ${c.password} (shown once)`, "info")) }, "console"));
      }
      card.replaceChildren(
        h("h1", {}, s.name, " ", stateBadge(s)),
        h("div", { class: "card" }, h("dl", { class: "props" },
          ...[["id", s.id], ["EC2 id", s.ec2_id], ["flavor", s.flavor], ["image", s.image], ["host", s.host || "—"], ["zone", s.zone || "—"], ["key", s.key_name || "—"],
            ["addresses", s.addresses.map((a) => `${a.network}: ${a.ip} ${a.mac}` + (a.public_ip ? ` public ${a.public_ip}` : "")).join("; ") || "—"],
            ["created", when(s.created_at)]].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
          h("dt", {}, "lease ends"), h("dd", {}, when(s.lease_expires_at) || "never", " ",
            s.lease_expires_at ? h("button", { type: "button", class: "secondary", id: "renew", onclick: () => attempt(() => api("POST", `/api/v1/servers/${id}/lease`, {}), draw) }, "Renew lease") : null))),
        h("div", {}, actionButtons(s, draw), extra));
      const events = await all(`/api/v1/servers/${id}/events`);
      timeline.replaceChildren(...events.map((e) => h("li", { class: e.kind },
        h("time", { datetime: e.created_at }, when(e.created_at)),
        `${e.kind.replaceAll("_", " ")}` + (e.action ? ` · ${e.action}` : "") + (e.operstate_to && e.operstate_to !== e.operstate_from ? ` · ${e.operstate_from || "—"} → ${e.operstate_to}` : "") + (e.message ? ` · ${e.message}` : ""))));
    };
    await draw();
    return {
      node: h("section", {}, card, h("h2", {}, "Timeline"), timeline),
      onEvent: (kind, data) => { if (data.server_id === id) draw(); },
    };
  },

  async create() {
    const [flavors, images, keys] = await Promise.all([all("/api/v1/flavors"), all("/api/v1/images"), all("/api/v1/keypairs")]);
    state.flavors = flavors;
    const field = (id, label, input) => [h("label", { for: id }, label), input];
    const name = h("input", { id: "c-name", required: true, value: "vm" });
    const flavor = h("select", { id: "c-flavor" }, flavors.map((f) => h("option", { value: f.name }, `${f.name} — ${f.vcpus} vCPU, ${f.ram_mb} MiB (${f.capacity} more fit)`)));
    const image = h("select", { id: "c-image" }, images.filter((i) => i.status === "active").map((i) => h("option", { value: i.name }, i.name)));
    const key = h("select", { id: "c-key" }, h("option", { value: "" }, "none"), keys.map((k) => h("option", { value: k.name }, k.name)));
    const count = h("input", { id: "c-count", type: "number", min: "1", max: "100", value: "1" });
    const zone = h("input", { id: "c-zone", placeholder: "any" });
    const userData = h("textarea", { id: "c-userdata", rows: "3" });
    const hold = h("input", { id: "c-hold", type: "checkbox" });
    const verdict = h("div", { id: "verdict", class: "verdict", role: "status", "aria-live": "polite" }, "checking…");
    const submit = h("button", { type: "submit", id: "c-submit", disabled: true }, "Create");
    const body = () => ({ name: name.value, flavor: flavor.value, image: image.value, count: Number(count.value) || 1, hold: hold.checked,
      ...(key.value ? { key_name: key.value } : {}), ...(zone.value ? { zone: zone.value } : {}), ...(userData.value ? { user_data: userData.value } : {}) });
    let asked = 0;
    const check = async () => {
      const mine = ++asked;
      const b = body();
      try {
        const answer = await api("POST", "/api/v1/quotas/check", { plan: [{ action: "create", flavor: b.flavor, count: b.count, zone: b.zone || null, image: b.image }] });
        if (mine !== asked) return;
        const step = answer.steps[0];
        verdict.className = "verdict " + (step.ok ? "ok" : "no");
        const left = Object.entries(answer.quotas).filter(([, q]) => q.limit > 0).map(([r, q]) => `${r} ${q.headroom_after}`).join(", ");
        verdict.textContent = step.ok ? `This would pass. Headroom after: ${left}.` : `This would be refused — ${step.code}: ${step.message}`;
        submit.disabled = !step.ok;
      } catch (e) { verdict.className = "verdict no"; verdict.textContent = e.message; submit.disabled = true; }
    };
    for (const el of [flavor, count, zone, image, hold]) el.addEventListener("input", check);
    check();
    const form = h("form", { class: "grid", id: "create-form", onsubmit: (ev) => {
      ev.preventDefault();
      attempt(() => api("POST", "/api/v1/servers", body()), () => { location.hash = "#/servers"; });
    } },
    ...field("c-name", "Name", name), ...field("c-flavor", "Flavor", flavor), ...field("c-image", "Image", image), ...field("c-key", "Key pair", key),
    ...field("c-count", "How many", count), ...field("c-zone", "Zone", zone), ...field("c-userdata", "User data", userData),
    ...field("c-hold", "Create on hold", hold), h("div", { class: "full" }, verdict), h("div", { class: "full" }, submit));
    return { node: h("section", {}, h("h1", {}, "Create servers"), form), onEvent: (kind) => { if (kind === "quota.changed") check(); } };
  },

  async quotas() {
    const box = h("div", {});
    const draw = async () => {
      const quotas = await api("GET", "/api/v1/quotas");
      box.replaceChildren(h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Resource"), h("th", {}, "Usage, pending and limit"))),
        h("tbody", {}, Object.entries(quotas).map(([r, q]) => h("tr", { "data-resource": r }, h("td", {}, r), h("td", {}, bar(q.usage, q.pending, q.limit, r))))))));
    };
    await draw();
    return { node: h("section", {}, h("h1", {}, "Quotas"), box), onEvent: (kind) => { if (kind === "quota.changed") draw(); } };
  },

  async flavors() {
    const flavors = await all("/api/v1/flavors");
    state.flavors = flavors;
    const most = Math.max(1, ...flavors.flatMap((f) => Object.values(f.zones)));
    const zones = [...new Set(flavors.flatMap((f) => Object.keys(f.zones)))].sort();
    const room = (n, zone) => h("div", {}, h("div", { class: "bar", role: "img", "aria-label": `${n} more fit in ${zone}` }, h("span", { style: `width:${(100 * n) / most}%` })), h("div", { class: "bar-label" }, `${n} more`));
    return { node: h("section", {}, h("h1", {}, "Flavors"), h("p", { class: "muted" }, "How many more VMs of each flavor the up hosts of each zone take now."),
      h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, h("th", {}, "Flavor"), h("th", {}, "vCPUs"), h("th", {}, "RAM (MiB)"), h("th", { class: "wide" }, "Disk (GB)"), zones.map((z) => h("th", {}, `Room in ${z}`)))),
        h("tbody", {}, flavors.map((f) => h("tr", { "data-flavor": f.name }, h("td", {}, f.name), h("td", {}, f.vcpus), h("td", {}, f.ram_mb), h("td", { class: "wide" }, f.disk_gb),
          zones.map((z) => h("td", {}, room(f.zones[z] || 0, z))))))))) };
  },

  async images() {
    const images = await all("/api/v1/images");
    return { node: h("section", {}, h("h1", {}, "Images"), h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Status"), h("th", { class: "wide" }, "Format"), h("th", {}, "Public"))),
      h("tbody", {}, images.map((i) => h("tr", {}, h("td", {}, i.name), h("td", {}, i.status), h("td", { class: "wide" }, i.disk_format), h("td", {}, i.is_public ? "yes" : "no"))))))) };
  },

  async keys() {
    const list = h("tbody", {});
    const draw = async () => {
      const keys = await all("/api/v1/keypairs");
      list.replaceChildren(...keys.map((k) => h("tr", {}, h("td", {}, k.name), h("td", { class: "wide" }, k.fingerprint),
        h("td", {}, h("button", { type: "button", class: "danger", "aria-label": `delete key ${k.name}`, onclick: () => attempt(() => api("DELETE", `/api/v1/keypairs/${encodeURIComponent(k.name)}`), draw) }, "delete")))));
    };
    const name = h("input", { id: "k-name", required: true });
    const pub = h("textarea", { id: "k-public", rows: "2", placeholder: "ssh-ed25519 AAAA… (empty: make one, shown once)" });
    const shown = h("div", {});
    const form = h("form", { class: "grid", onsubmit: (ev) => { ev.preventDefault(); attempt(() => api("POST", "/api/v1/keypairs", { name: name.value, ...(pub.value ? { public_key: pub.value } : {}) }), (k) => { shown.replaceChildren(k.private_key ? h("div", {}, h("p", {}, "The private key, shown once:"), h("pre", { class: "secret" }, k.private_key)) : ""); draw(); }); } },
      h("label", { for: "k-name" }, "Name"), name, h("label", { for: "k-public" }, "Public key"), pub, h("div", { class: "full" }, h("button", { type: "submit" }, "Add key pair")));
    await draw();
    return { node: h("section", {}, h("h1", {}, "Key pairs"), h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", { class: "wide" }, "Fingerprint"), h("th", {}, ""))), list)), h("h2", {}, "Add"), form, shown) };
  },

  async credentials() {
    const list = h("tbody", {});
    const shown = h("div", {});
    const draw = async () => {
      const creds = await all("/api/v1/credentials/ec2");
      list.replaceChildren(...creds.map((c) => h("tr", {}, h("td", {}, c.access_key), h("td", { class: "wide" }, when(c.created_at)),
        h("td", {}, h("button", { type: "button", class: "danger", onclick: () => attempt(() => api("DELETE", `/api/v1/credentials/ec2/${c.access_key}`), draw) }, "delete")))));
    };
    await draw();
    return { node: h("section", {}, h("h1", {}, "EC2 credentials"),
      h("p", {}, h("button", { type: "button", onclick: () => attempt(() => api("POST", "/api/v1/credentials/ec2"), (c) => { shown.replaceChildren(h("p", {}, "The secret key, shown once:"), h("pre", { class: "secret" }, `${c.access_key}\n${c.secret_key}`)); draw(); }) }, "Make an access key")),
      shown, h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Access key"), h("th", { class: "wide" }, "Made"), h("th", {}, ""))), list))) };
  },

  async hosts() {
    const [hosts, servers] = await Promise.all([all("/api/v1/admin/hosts"), all("/api/v1/servers?all_projects=true")]);
    return { node: h("section", {}, h("h1", {}, "Hosts"), h("div", { class: "hosts" }, hosts.map((host) => {
      const cpus = Math.floor(host.cpus * host.cpu_ratio), ram = Math.floor(host.ram_mb * host.ram_ratio);
      const here = servers.filter((s) => s.host === host.name && s.operstate !== "DESTROYED");
      return h("div", { class: "card", "data-host": host.name }, h("h2", {}, host.name, " ", h("span", { class: `state ${host.state === "up" ? "STARTED" : "ERROR"}` }, host.state)),
        h("p", { class: "muted" }, `zone ${host.zone} · heartbeat ${when(host.last_heartbeat) || "never"}`),
        h("div", {}, "vCPUs"), bar(host.used_cpus, 0, cpus, "vCPUs"), h("div", {}, "RAM (MiB)"), bar(host.used_ram_mb, 0, ram, "RAM"),
        h("p", {}, `${here.length} VM(s)`), h("ul", {}, here.slice(0, 20).map((s) => h("li", {}, h("a", { href: `#/server/${s.id}` }, s.name), " ", stateBadge(s)))));
    }))) };
  },

  async drift() {
    const box = h("div", { id: "drift" });
    const show = (title, report, counts) => {
      const rows = Object.entries(counts).map(([k, n]) => h("tr", {}, h("td", {}, k), h("td", {}, n), h("td", {}, (report[k] || []).slice(0, 5).map((e) => Object.entries(e).map(([a, b]) => `${a}=${b}`).join(" ")).join("; "))));
      box.replaceChildren(h("h2", {}, title), h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Kind"), h("th", {}, "Found"), h("th", {}, "What"))), h("tbody", {}, rows))),
        (report.actions || []).length ? h("ul", {}, report.actions.map((a) => h("li", {}, a))) : h("p", { class: "muted" }, "Nothing was repaired."),
        (report.unreachable_hosts || []).length ? h("p", {}, `Not judged (no fresh inventory): ${report.unreachable_hosts.join(", ")}`) : "");
    };
    const last = await api("GET", "/api/v1/admin/drift");
    show(last.started_at ? `Last periodic pass, ${when(last.started_at)}` : "No periodic pass yet", last.report, last.counts);
    const run = (fix) => attempt(() => api("POST", "/api/v1/admin/reconcile", { fix, wait: 5 }), (r) => {
      // The report's kinds are its lists of findings (the hosts not judged and the repairs are not kinds).
      const counts = Object.fromEntries(Object.entries(r).filter(([k, v]) => Array.isArray(v) && !["unreachable_hosts", "actions"].includes(k)).map(([k, v]) => [k, v.length]));
      show(fix ? "Reconciled and repaired, just now" : "Reconciled (report only), just now", r, counts);
    });
    return { node: h("section", {}, h("h1", {}, "Drift"), h("p", {},
      h("button", { type: "button", id: "reconcile", onclick: () => run(false) }, "Reconcile now"),
      h("button", { type: "button", class: "secondary", id: "reconcile-fix", onclick: () => run(true) }, "Reconcile and repair")), box) };
  },

  async projects() {
    const [projects, users] = await Promise.all([all("/api/v1/admin/projects"), all("/api/v1/admin/users")]);
    return { node: h("section", {}, h("h1", {}, "Projects and users"), h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Project"), h("th", {}, "Users"), h("th", { class: "wide" }, "Id"))),
      h("tbody", {}, projects.map((p) => h("tr", {}, h("td", {}, p.name), h("td", {}, users.filter((u) => u.project_id === p.id).map((u) => `${u.name} (${u.role})`).join(", ")), h("td", { class: "wide" }, p.id))))))) };
  },

  async leases() {
    const before = new Date(Date.now() + 7 * 86400e3).toISOString();
    const servers = await all(`/api/v1/admin/leases?before=${encodeURIComponent(before)}`);
    return { node: h("section", {}, h("h1", {}, "Leases ending within 7 days"), servers.length ? h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "Ends"), h("th", {}, "Server"), h("th", { class: "wide" }, "Project"), h("th", {}, "State"))),
      h("tbody", {}, servers.map((s) => h("tr", {}, h("td", {}, when(s.lease_expires_at)), h("td", {}, h("a", { href: `#/server/${s.id}` }, s.name)), h("td", { class: "wide" }, s.project_id), h("td", {}, stateBadge(s))))))) : h("p", {}, "None.")) };
  },
};

const USER_NAV = [["servers", "Servers"], ["create", "Create"], ["quotas", "Quotas"], ["flavors", "Flavors"], ["images", "Images"], ["keys", "Key pairs"], ["credentials", "EC2 credentials"]];
const ADMIN_NAV = [["hosts", "Hosts"], ["drift", "Drift"], ["projects", "Projects"], ["leases", "Leases"]];
const ADMIN_VIEWS = new Set(ADMIN_NAV.map(([k]) => k));

async function route() {
  if (!state.me) return;
  const [, name = "servers", arg] = location.hash.replace(/^#\/?/, "#").split(/[#/]/);
  const view = views[name] && (!ADMIN_VIEWS.has(name) || state.me.is_admin) ? name : "servers";
  document.querySelectorAll("#nav a").forEach((a) => { if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current"); });
  alertBox("");
  try {
    const shown = await views[view](arg);
    state.view = shown;
    $("#view").replaceChildren(shown.node);
    document.title = `Nephos · ${view}`;
  } catch (e) {
    $("#view").replaceChildren(h("p", {}, "This page could not be shown."));
    alertBox(e.message);
  }
}

async function signedIn() {
  try {
    state.me = await api("GET", "/api/v1/me");
  } catch (e) {
    sessionStorage.removeItem(TOKEN);
    alertBox(e.message);
    return false;
  }
  $("#signin").hidden = true;
  const nav = $("#nav");
  nav.replaceChildren(...USER_NAV.concat(state.me.is_admin ? ADMIN_NAV : []).map(([k, label]) => h("a", { href: `#/${k}`, "data-view": k }, label)));
  nav.hidden = false;
  $("#signout").hidden = false;
  $("#who").textContent = state.me.is_admin ? "admin" : `project ${String(state.me.project_id).slice(0, 8)}`;
  state.flavors = await all("/api/v1/flavors").catch(() => []);
  follow();
  await route();
  return true;
}

$("#signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN, $("#token").value.trim());
  $("#token").value = "";
  await signedIn();
});
$("#signout").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN);
  if (state.stream) state.stream.abort();
  location.hash = "";
  location.reload();
});
window.addEventListener("hashchange", route);
if (sessionStorage.getItem(TOKEN)) signedIn();
