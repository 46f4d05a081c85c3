// SpiderGate dashboard: plain JS, no build step, no dependencies. Served under a strict CSP,
// so there is no inline script, no inline style attribute, no eval and no innerHTML with data:
// every node is built with the DOM API below. Every figure shown comes from the admin API.
'use strict';

(() => {
  const TOKEN_KEY = 'spidergate.admin_token'; // sessionStorage only: never a cookie or a URL.
  const POLL_MS = 2000; // keys, members and the first traces page refresh this often
  const TRACE_PAGE = 25;
  const KEY_PAGE = 50; // keys per page on Keys and Members (the API pages and searches)
  const KEY_OPTIONS = 500; // keys offered by the key pickers of Traces and Usage
  const PALETTE = 10; // .c0 .. .c9 in app.css

  const PAGES = {
    '/dashboard/gate/keys': { id: 'keys', group: 'Gate', title: 'Keys', render: renderKeys },
    '/dashboard/gate/traces': { id: 'traces', group: 'Gate', title: 'Traces', render: renderTraces },
    '/dashboard/gate/usage': { id: 'usage', group: 'Gate', title: 'Usage', render: renderUsage },
    '/dashboard/settings/members/agents': {
      id: 'members', group: 'Settings › Members', title: 'Agents', render: renderMembers,
    },
  };
  const HOME = '/dashboard/gate/keys';

  // Fields of the key dialogs, and the API field each one maps to.
  const PARAM_TO_FIELD = {
    monthly_budget_usd: 'budget',
    budget_usd: 'budget',
    allowed_models: 'models',
  };

  const state = {
    info: null, // GET /admin/info
    keys: null, // the page of keys shown: last GET /admin/keys?usage=true&limit=..&offset=..
    keyTotal: 0, // how many keys match the current search and status
    // The search, status and page of Keys and Members (kept while moving between pages).
    keyQuery: { q: '', status: 'all', offset: 0 },
    keyOptions: null, // the key pickers' list (GET /admin/keys?all=true&limit=KEY_OPTIONS)
    groups: null, // last GET /admin/groups
    cleanup: null, // stops the current page's timers
    modelColors: new Map(),
  };

  // ---------------------------------------------------------------- DOM helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    add(el, children);
    return el;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    add(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') el.setAttribute('class', v);
      else if (k === 'text') el.textContent = v;
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'value' && 'value' in el) el.value = v;
      else if (k === 'checked') el.checked = !!v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }

  function add(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }

  /** Replaces the children of `el` (skipping null/false, flattening arrays). */
  function fill(el, ...children) {
    el.replaceChildren();
    add(el, children);
    return el;
  }

  /** Replaces `oldEl` with `newEl` only when they differ, so a poll never disturbs a stable node. */
  function patch(oldEl, newEl) {
    if (!oldEl) return newEl;
    if (oldEl.isEqualNode(newEl)) return oldEl;
    oldEl.replaceWith(newEl);
    return newEl;
  }

  function icon(name) {
    const paths = {
      plus: 'M12 5v14M5 12h14',
      copy: 'M9 9h10v10H9zM5 15V5h10',
      trace: 'M4 6h16M4 12h10M4 18h13',
      edit: 'M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4',
      rotate: 'M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6',
      revoke: 'M6 6l12 12M18 6 6 18',
      key: 'M15 7a4 4 0 1 1-3.9 4.9L4 19v-3h3v-3h3l1.1-1.1A4 4 0 0 1 15 7z',
      chart: 'M4 20V10M10 20V4M16 20v-7M22 20H2',
      users: 'M16 19v-1a4 4 0 0 0-8 0v1M12 11a3 3 0 1 0 0-6 3 3 0 0 0 0 6zM20 19v-1a3 3 0 0 0-3-3M17 5a3 3 0 0 1 0 6',
      list: 'M8 6h13M8 12h13M8 18h13M3 6h.01M3 12h.01M3 18h.01',
      out: 'M15 4h4v16h-4M10 8l-4 4 4 4M6 12h11',
      left: 'M15 6l-6 6 6 6',
      right: 'M9 6l6 6-6 6',
      refresh: 'M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6',
      layers: 'M12 3 2 8l10 5 10-5zM2 13l10 5 10-5M2 18l10 5 10-5',
      bell: 'M6 16v-5a6 6 0 0 1 12 0v5l2 2H4zM10 21a2 2 0 0 0 4 0',
    };
    return s('svg', { class: 'icon', viewBox: '0 0 24 24', 'aria-hidden': 'true' },
      s('path', { d: paths[name] || '' }));
  }

  function logo() {
    return s('svg', { class: 'logo', viewBox: '0 0 32 32', 'aria-hidden': 'true' },
      s('use', { href: '#logo-mark' }));
  }

  function button(label, attrs = {}, iconName) {
    return h('button', { type: 'button', class: 'btn', ...attrs }, iconName ? icon(iconName) : null,
      h('span', { text: label }));
  }

  // ---------------------------------------------------------------- formatting

  const moneyFormats = new Map();
  /** `$1,234.56`; amounts under ten cents keep three significant digits (`$0.000150`). */
  function money(usd) {
    if (usd === null || usd === undefined || Number.isNaN(Number(usd))) return '—';
    const v = Number(usd);
    const a = Math.abs(v);
    let digits = 2;
    if (a > 0 && a < 0.1) digits = Math.min(9, Math.floor(-Math.log10(a)) + 3);
    if (!moneyFormats.has(digits)) {
      moneyFormats.set(digits, new Intl.NumberFormat('en-US', {
        style: 'currency', currency: 'USD', minimumFractionDigits: digits, maximumFractionDigits: digits,
      }));
    }
    return moneyFormats.get(digits).format(v);
  }

  /** A short money label for chart axes. */
  function moneyAxis(usd) {
    if (usd === 0) return '$0';
    if (usd >= 1000) return '$' + new Intl.NumberFormat('en-US', { maximumFractionDigits: 1, notation: 'compact' }).format(usd);
    if (usd >= 1) return '$' + trimZeros(usd.toFixed(2));
    return '$' + String(Number(usd.toPrecision(3)));
  }

  function trimZeros(x) {
    return x.includes('.') ? x.replace(/\.?0+$/, '') : x;
  }

  const intFmt = new Intl.NumberFormat('en-US');
  function int(n) {
    return n === null || n === undefined ? '—' : intFmt.format(n);
  }

  const dateTimeFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
  const traceTimeFmt = new Intl.DateTimeFormat(undefined, {
    month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
  });
  const relFmt = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });

  function relative(ms) {
    const diff = ms - Date.now();
    const a = Math.abs(diff);
    const units = [
      ['year', 365 * 864e5], ['month', 30 * 864e5], ['week', 7 * 864e5], ['day', 864e5],
      ['hour', 36e5], ['minute', 6e4], ['second', 1e3],
    ];
    for (const [unit, size] of units) {
      if (a >= size || unit === 'second') {
        if (unit === 'second' && a < 45e3) return diff < 0 ? 'just now' : 'in a few seconds';
        return relFmt.format(Math.round(diff / size), unit);
      }
    }
    return '';
  }

  /** A `<time>` in the browser's zone, with the UTC ISO time on hover. */
  function timeEl(iso, mode = 'datetime') {
    if (!iso) return h('span', { class: 'muted', text: 'never' });
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return h('span', { text: iso });
    const utc = d.toISOString().replace('.000Z', 'Z');
    let text;
    if (mode === 'relative') text = relative(d.getTime());
    else if (mode === 'trace') text = traceTimeFmt.format(d);
    else text = dateTimeFmt.format(d);
    return h('time', { datetime: utc, title: `${utc} (UTC)`, text });
  }

  function plural(n, one, many) {
    return `${int(n)} ${n === 1 ? one : many || one + 's'}`;
  }

  function colorClass(model) {
    if (!state.modelColors.has(model)) {
      state.modelColors.set(model, state.modelColors.size % PALETTE);
    }
    return 'c' + state.modelColors.get(model);
  }

  function seedColors() {
    if (!state.info) return;
    for (const m of state.info.models || []) colorClass(typeof m === 'string' ? m : m.id);
  }

  /** A horizontal bar drawn in SVG (CSP-safe: widths are attributes, not inline styles). */
  function bar(fraction, cls = '', label) {
    const f = Math.max(0, Math.min(1, Number(fraction) || 0));
    const pct = (f * 100).toFixed(2) + '%';
    return s('svg', {
      class: 'bar ' + cls, role: 'img', 'aria-label': label || `${Math.round(f * 100)}%`,
      preserveAspectRatio: 'none',
    },
    s('rect', { class: 'bar-track', x: 0, y: 0, width: '100%', height: '100%', rx: 4 }),
    f > 0 ? s('rect', { class: 'bar-fill', x: 0, y: 0, width: pct, height: '100%', rx: 4 }) : null);
  }

  // ---------------------------------------------------------------- admin API

  class ApiError extends Error {
    constructor(status, body, fallback) {
      const err = body && body.error ? body.error : {};
      super(err.message || fallback || `The admin API answered ${status}.`);
      this.status = status;
      this.code = err.code || null;
      this.param = err.param || null;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function rawFetch(method, path, body, bearer) {
    // The door header names the dashboard in the audit log (the admin API is the other door).
    const headers = { Authorization: 'Bearer ' + bearer, Accept: 'application/json', 'X-SpiderGate-Door': 'dashboard' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store', credentials: 'omit', redirect: 'error',
      });
    } catch (e) {
      throw new ApiError(0, null, 'The admin API cannot be reached. Is the gateway running?');
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
    if (!res.ok) throw new ApiError(res.status, data);
    return data;
  }

  /** Every call carries the bearer token; a 401 anywhere signs out and shows the sign-in form. */
  async function api(method, path, body) {
    const t = token();
    if (!t) {
      signOut('Sign in with the admin token to continue.');
      throw new ApiError(401, null, 'Not signed in.');
    }
    try {
      return await rawFetch(method, path, body, t);
    } catch (e) {
      if (e.status === 401) signOut('The admin token was refused. Sign in again.');
      throw e;
    }
  }

  async function loadInfo(bearer) {
    try {
      return await rawFetch('GET', '/admin/info', undefined, bearer);
    } catch (e) {
      if (e.status !== 404) throw e;
      // An older gateway without /admin/info: the keys call still checks the token.
      await rawFetch('GET', '/admin/keys', undefined, bearer);
      return { public_url: null, models: [], aliases: [] };
    }
  }

  /** The page of keys for the current search, status and offset (server-side paging). */
  function keyQueryString() {
    const kq = state.keyQuery;
    const q = new URLSearchParams({ usage: 'true', status: kq.status, limit: String(KEY_PAGE), offset: String(kq.offset) });
    if (kq.q.trim()) q.set('q', kq.q.trim());
    return q.toString();
  }

  async function fetchKeys() {
    const asked = keyQueryString();
    const data = await api('GET', '/admin/keys?' + asked);
    // A search typed while this was in flight wins: drop an answer to an older question.
    if (asked !== keyQueryString()) return state.keys;
    const total = Number(data && data.total) || 0;
    if (state.keyQuery.offset > 0 && state.keyQuery.offset >= total) {
      // The last page emptied (keys revoked or a narrower search): show the new last page.
      state.keyQuery.offset = Math.max(0, Math.floor((total - 1) / KEY_PAGE) * KEY_PAGE);
      return fetchKeys();
    }
    state.keys = (data && data.data) || [];
    state.keyTotal = total;
    setLive(true);
    return state.keys;
  }

  /** Keys for the pickers of Traces and Usage (no usage figures; the newest KEY_OPTIONS). */
  async function fetchKeyOptions() {
    const data = await api('GET', `/admin/keys?all=true&limit=${KEY_OPTIONS}`);
    state.keyOptions = (data && data.data) || [];
    return state.keyOptions;
  }

  async function fetchGroups() {
    const data = await api('GET', '/admin/groups');
    state.groups = (data && data.data) || [];
    return state.groups;
  }

  // ---------------------------------------------------------------- sign-in

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    stopPage();
    for (const d of document.querySelectorAll('dialog')) { d.close(); d.remove(); }
    state.keys = null;
    state.keyOptions = null;
    state.groups = null;
    state.info = null;
    renderSignIn(message);
  }

  function renderSignIn(message, isError = true) {
    const input = h('input', {
      type: 'password', name: 'token', id: 'signin-token', autocomplete: 'current-password',
      spellcheck: 'false', placeholder: 'Admin token', required: true,
    });
    const msg = h('p', {
      class: 'form-error' + (message ? '' : ' empty') + (isError ? '' : ' info'),
      role: 'alert', 'data-testid': 'signin-error', text: message || '',
    });
    const submit = h('button', { type: 'submit', class: 'btn primary block', text: 'Sign in' });
    const form = h('form', { class: 'signin-card', novalidate: true, autocomplete: 'off' },
      h('div', { class: 'signin-brand' }, logo(), h('span', { text: 'SpiderGate' })),
      h('h1', { text: 'Sign in to the dashboard' }),
      h('p', { class: 'muted' },
        'Paste the admin token: the value of the environment variable named by ',
        h('code', { text: 'admin.token_env' }), ' (', h('code', { text: 'SPIDERGATE_ADMIN_TOKEN' }),
        ' by default). It is kept in this tab only.'),
      h('label', { class: 'field', for: 'signin-token' }, h('span', { class: 'label', text: 'Admin token' }), input),
      msg, submit);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) {
        showMsg('Enter the admin token.');
        return;
      }
      submit.disabled = true;
      submit.textContent = 'Signing in…';
      try {
        const info = await loadInfo(value);
        sessionStorage.setItem(TOKEN_KEY, value);
        state.info = info || {};
        seedColors();
        renderShell();
        route();
      } catch (err) {
        // Draw the form again, empty, with the reason.
        renderSignIn(err.status === 401
          ? 'That token was refused. Check the admin token and try again.'
          : err.message);
      }
    });
    function showMsg(m) {
      msg.textContent = m;
      msg.classList.remove('empty');
    }
    const root = document.getElementById('root');
    fill(root, h('main', { class: 'signin' }, form,
      h('p', { class: 'signin-foot muted', text: 'LLM gateway · keys, limits, budgets and traces' })));
    document.title = 'Sign in · SpiderGate';
    input.focus();
  }

  // ---------------------------------------------------------------- shell and routing

  function navLink(href, id, label, iconName) {
    return h('a', { href, 'data-nav': true, 'data-page': id, class: 'nav-link' }, icon(iconName), h('span', { text: label }));
  }

  function renderShell() {
    const root = document.getElementById('root');
    const signOutBtn = button('Sign out', { class: 'btn ghost small', 'data-action': 'signout' }, 'out');
    signOutBtn.addEventListener('click', () => signOut('Signed out.'));
    const shell = h('div', { class: 'app' },
      h('aside', { class: 'sidebar' },
        h('a', { class: 'brand', href: HOME, 'data-nav': true }, logo(), h('span', { text: 'SpiderGate' })),
        h('nav', { class: 'nav', 'aria-label': 'Main' },
          h('div', { class: 'nav-group', text: 'Gate' }),
          navLink('/dashboard/gate/keys', 'keys', 'Keys', 'key'),
          navLink('/dashboard/gate/traces', 'traces', 'Traces', 'list'),
          navLink('/dashboard/gate/usage', 'usage', 'Usage', 'chart'),
          navLink('/dashboard/gate/groups', 'groups', 'Groups', 'layers'),
          navLink('/dashboard/gate/alerts', 'alerts', 'Alerts', 'bell'),
          h('div', { class: 'nav-group', text: 'Settings' }),
          navLink('/dashboard/settings/members/agents', 'members', 'Members', 'users')),
        h('div', { class: 'sidebar-foot' },
          h('div', { class: 'live', id: 'live' }, h('span', { class: 'live-dot' }), h('span', { id: 'live-text', text: 'Connected' })),
          h('div', { class: 'muted small gateway-url', id: 'gateway-url', title: 'Public URL agents use' },
            publicUrl()),
          signOutBtn)),
      h('div', { class: 'main' },
        h('header', { class: 'topbar' },
          h('div', { class: 'titles' },
            h('div', { class: 'crumbs', id: 'crumbs' }),
            h('h1', { id: 'page-title' })),
          h('div', { class: 'topbar-actions' },
            button('Connect an agent', { class: 'btn primary', 'data-action': 'connect' }, 'plus'))),
        h('section', { id: 'page', class: 'page' })));
    fill(root, shell);
  }

  function setLive(ok, text) {
    const el = document.getElementById('live');
    if (!el) return;
    el.classList.toggle('down', !ok);
    document.getElementById('live-text').textContent = text || (ok
      ? 'Live · ' + new Intl.DateTimeFormat(undefined, { timeStyle: 'medium' }).format(new Date())
      : 'Reconnecting…');
  }

  function publicUrl() {
    const u = state.info && state.info.public_url;
    return u ? String(u).replace(/\/+$/, '') : 'http://GATEWAY_HOST:PORT';
  }

  function stopPage() {
    if (state.cleanup) {
      try { state.cleanup(); } catch (e) { /* a page's cleanup never blocks navigation */ }
    }
    state.cleanup = null;
  }

  function navigate(url, replace = false) {
    if (replace) history.replaceState(null, '', url);
    else history.pushState(null, '', url);
    route();
  }

  function route() {
    if (!token()) { renderSignIn(); return; }
    if (!document.getElementById('page')) renderShell();
    let path = location.pathname.replace(/\/+$/, '');
    if (path === '/dashboard/settings/members' || path === '/dashboard/settings') {
      history.replaceState(null, '', '/dashboard/settings/members/agents' + location.search);
      path = '/dashboard/settings/members/agents';
    }
    if (!PAGES[path]) {
      history.replaceState(null, '', HOME);
      path = HOME;
    }
    const page = PAGES[path];
    stopPage();
    for (const a of document.querySelectorAll('.nav-link')) {
      const on = a.dataset.page === page.id;
      a.classList.toggle('active', on);
      if (on) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
    document.getElementById('crumbs').textContent = page.group;
    document.getElementById('page-title').textContent = page.title;
    document.title = `${page.title} · SpiderGate`;
    const container = document.getElementById('page');
    fill(container);
    container.dataset.page = page.id;
    const params = new URLSearchParams(location.search);
    const ctx = { alive: true };
    state.ctx = ctx;
    const cleanup = page.render(container, params, ctx);
    state.cleanup = () => {
      ctx.alive = false;
      if (typeof cleanup === 'function') cleanup();
    };
  }

  /** Runs `fn` now and every `ms` (never two at once); returns a stop function. */
  function poller(fn, ms, ctx) {
    let timer = null;
    let stopped = false;
    const tick = async () => {
      if (stopped || !ctx.alive) return;
      try {
        await fn();
      } catch (e) {
        if (e.status === 401) return;
        if (e.status === 0) setLive(false);
        else setLive(false, e.message);
      }
      if (!stopped && ctx.alive) timer = setTimeout(tick, ms);
    };
    tick();
    return () => { stopped = true; clearTimeout(timer); };
  }

  // ---------------------------------------------------------------- toasts

  function toast(message, kind = 'ok') {
    const el = h('div', { class: 'toast ' + kind, role: 'status', text: message });
    document.getElementById('toasts').append(el);
    setTimeout(() => el.classList.add('leaving'), 3600);
    setTimeout(() => el.remove(), 4000);
  }

  // ---------------------------------------------------------------- key rendering (shared)

  function statusBadge(k) {
    return h('span', { class: 'badge status-' + k.status, 'data-testid': 'key-status', text: k.status });
  }

  function limitText(v, unit) {
    return v === null || v === undefined ? 'unlimited' : `${int(v)}${unit ? ' ' + unit : ''}`;
  }

  function limitSummary(k) {
    const parts = [];
    if (k.rpm) parts.push(`${int(k.rpm)}/min`);
    if (k.rpd) parts.push(`${int(k.rpd)}/day`);
    if (k.max_inflight) parts.push(`${int(k.max_inflight)} in flight`);
    if (k.max_usd_per_hour) parts.push(`${money(k.max_usd_per_hour)}/hour`);
    if (k.loop_limit) parts.push(`${int(k.loop_limit)} same/min`);
    return parts.length ? parts.join(' · ') : h('span', { class: 'muted', text: 'no limits' });
  }

  function modelsText(k) {
    const list = k.allowed_models || [];
    if (list.length) return list.join(', ');
    return k.free_only ? 'free models only' : 'all models';
  }

  function spendOf(k) {
    return k.usage ? Number(k.usage.spend_usd) || 0 : 0;
  }

  // Spend of the keys below this one (its minted keys): its budget counts it too.
  function treeSpendOf(k) {
    return k.usage ? Number(k.usage.tree_spend_usd) || 0 : 0;
  }

  function budgetOf(k) {
    if (k.usage && k.usage.budget_usd !== undefined) return k.usage.budget_usd;
    return k.monthly_budget_usd;
  }

  function spendBlock(k) {
    const spend = spendOf(k);
    const tree = treeSpendOf(k);
    const budget = budgetOf(k);
    const mode = (k.usage && k.usage.budget_mode) || k.budget_mode;
    // What the budget is measured against: the key's own spend and its tree's.
    const counted = spend + tree;
    const frac = budget ? counted / budget : 0;
    const level = !budget ? 'none' : frac >= 1 ? 'over' : frac >= 0.8 ? 'warn' : 'ok';
    return h('div', { class: 'spend' },
      h('div', { class: 'spend-head' },
        h('span', { class: 'label', text: 'Spend this month' }),
        k.usage && k.usage.month ? h('span', { class: 'muted small', text: k.usage.month }) : null),
      h('div', { class: 'spend-line' },
        h('span', { class: 'spend-amount', 'data-testid': 'spend', text: money(spend) }),
        budget
          ? h('span', { class: 'muted', 'data-testid': 'budget' }, 'of ', money(budget),
            h('span', { class: 'mode mode-' + mode, text: mode, title: mode === 'hard' ? 'Requests are refused once the budget is spent' : 'Over-budget requests are allowed and flagged' }))
          : h('span', { class: 'muted', 'data-testid': 'budget', text: 'no budget' })),
      tree > 0
        ? h('div', { class: 'muted small', 'data-testid': 'tree-spend',
          text: `+ ${money(tree)} by its child keys, counted against its budget` })
        : null,
      // Any spend at all shows a sliver, so a tiny amount is not mistaken for none.
      bar(budget ? Math.max(frac, counted > 0 ? 0.012 : 0) : 0, 'spend-bar level-' + level,
        budget ? `${Math.round(frac * 100)}% of the monthly budget` : 'No budget'));
  }

  function modelBars(k) {
    const by = (k.usage && k.usage.by_model) || {};
    const rows = Object.entries(by)
      .map(([model, u]) => ({ model, spend: Number(u.spend_usd) || 0, requests: u.requests || 0,
        tokens: (u.prompt_tokens || 0) + (u.completion_tokens || 0) }))
      .sort((a, b) => b.spend - a.spend || b.requests - a.requests || a.model.localeCompare(b.model));
    const max = Math.max(0, ...rows.map((r) => r.spend));
    return h('div', { class: 'by-model', 'data-testid': 'by-model' },
      h('div', { class: 'label', text: 'Spend per model' }),
      rows.length === 0
        ? h('p', { class: 'muted small empty-models', text: 'No requests this month yet.' })
        : rows.map((r) => h('div', {
          class: 'model-row', 'data-model': r.model, 'data-testid': 'model-bar',
          title: `${r.model}: ${money(r.spend)} · ${plural(r.requests, 'request')} · ${int(r.tokens)} tokens`,
        },
        h('span', { class: 'model-name', text: r.model }),
        bar(max > 0 ? r.spend / max : (r.requests ? 0.02 : 0), 'model-bar ' + colorClass(r.model), `${r.model} ${money(r.spend)}`),
        h('span', { class: 'model-spend', text: money(r.spend) }),
        h('span', { class: 'model-reqs muted', text: plural(r.requests, 'req', 'reqs') }))));
  }

  function limitsList(k) {
    const u = k.usage || {};
    const item = (label, value, extra, tip) => h('div', { class: 'limit', title: tip || null },
      h('dt', { text: label }), h('dd', {}, value, extra ? h('span', { class: 'muted small', text: ' ' + extra }) : null));
    const now = Date.now();
    const exp = k.expires_at ? new Date(k.expires_at).getTime() : null;
    const expiry = k.revoked_at
      ? h('span', {}, 'revoked ', timeEl(k.revoked_at, 'relative'))
      : exp ? h('span', { class: exp < now ? 'danger-text' : exp - now < 3 * 864e5 ? 'warn-text' : '' },
        timeEl(k.expires_at, 'relative')) : 'never';
    return h('dl', { class: 'limits' },
      item('RPM', limitText(k.rpm), u.requests_this_minute !== undefined ? `· ${int(u.requests_this_minute)} now` : null, 'Requests per minute'),
      item('RPD', limitText(k.rpd), u.requests_today !== undefined ? `· ${int(u.requests_today)} today` : null, 'Requests per UTC day'),
      item('In flight', limitText(k.max_inflight), u.requests_in_flight !== undefined ? `· ${int(u.requests_in_flight)} now` : null, 'Concurrent requests'),
      item('Per hour', k.max_usd_per_hour ? money(k.max_usd_per_hour) : 'unlimited', null, 'Spend over any rolling 60 minutes (max_usd_per_hour)'),
      item('Loops', limitText(k.loop_limit, 'same / min'), null, 'The same request at most this many times per rolling 60 s (loop_limit)'),
      item('Models', modelsText(k), null, (k.scopes || []).length ? 'Scopes: ' + k.scopes.join(', ') : null),
      item('Expires', expiry, null, k.expires_at ? `Expires ${new Date(k.expires_at).toISOString()}` : null),
      item('Last used', timeEl(k.last_used_at, 'relative')),
      item('Group', groupLink(k.group), null, 'Its spend and requests also count against the group'),
      item('Parent', parentLink(k.parent_id), null, k.parent_id ? 'The key that minted this one' : 'Made by an operator'));
  }

  function groupLink(name) {
    return name
      ? h('a', { href: '/dashboard/gate/groups', 'data-nav': true, 'data-testid': 'key-group', 'data-group': name, text: name })
      : h('span', { class: 'muted', 'data-testid': 'key-group', text: 'none' });
  }

  function parentLink(id) {
    return id
      ? h('a', { href: '/dashboard/gate/keys?q=' + encodeURIComponent(id), 'data-nav': true, 'data-testid': 'key-parent', 'data-key-id': id },
        h('code', { class: 'small', text: id }))
      : h('span', { class: 'muted', 'data-testid': 'key-parent', text: 'none' });
  }

  /** The keys `parentId` minted, as a list that refreshes while it is on the page. */
  function childrenPanel(parentId) {
    const panel = h('div', { class: 'children-panel', 'data-testid': 'children', 'data-parent-id': parentId },
      h('div', { class: 'label', text: 'Children' }),
      h('p', { class: 'muted small', text: 'Loading…' }));
    async function load() {
      const q = new URLSearchParams({ parent: parentId, all: 'true', limit: '100' });
      const data = await api('GET', '/admin/keys?' + q);
      const kids = (data && data.data) || [];
      const total = Number(data && data.total) || kids.length;
      const list = kids.length
        ? h('ul', { class: 'children-list' }, kids.map((c) => h('li', { 'data-testid': 'child', 'data-key-id': c.id, 'data-status': c.status },
          h('a', { href: '/dashboard/gate/keys?q=' + encodeURIComponent(c.id), 'data-nav': true, class: 'child-name', text: c.name }),
          ' ', h('code', { class: 'small muted', text: c.id }), ' ', statusBadge(c))),
        total > kids.length ? h('li', { class: 'muted small', text: `and ${int(total - kids.length)} more` }) : null)
        : h('p', { class: 'muted small', 'data-testid': 'no-children', text: 'No child keys: this key has not minted any.' });
      const next = h('div', { class: 'children-body' }, list);
      const old = panel.querySelector('.children-body');
      if (old) patch(old, next);
      else fill(panel, h('div', { class: 'label', text: `Children (${int(total)})` }), next);
      panel.querySelector('.label').textContent = `Children (${int(total)})`;
    }
    const loop = async () => {
      if (!panel.isConnected) return;
      try { await load(); } catch (e) {
        if (e.status !== 401 && panel.isConnected) fill(panel, errorBanner(e));
      }
      if (panel.isConnected) setTimeout(loop, POLL_MS);
    };
    return { panel, start: () => setTimeout(loop, 0) };
  }

  /** "Children" on a card opens a panel in it; in the members table, a dialog. */
  function toggleChildren(btn, id) {
    const card = btn.closest('article.key-card');
    if (card) {
      const open = card.querySelector('.children-panel');
      if (open) { open.remove(); btn.setAttribute('aria-expanded', 'false'); return; }
      const c = childrenPanel(id);
      card.insertBefore(c.panel, card.querySelector('.card-actions'));
      btn.setAttribute('aria-expanded', 'true');
      c.start();
      return;
    }
    const k = findKey(id);
    const m = modal(`Keys minted by ${k ? k.name : id}`, { testid: 'children-dialog' });
    const c = childrenPanel(id);
    m.body.append(c.panel);
    c.start();
  }

  function rotationNote(k) {
    const until = k.previous_secret_expires_at ? new Date(k.previous_secret_expires_at).getTime() : 0;
    if (!until || until <= Date.now()) return null;
    return h('p', { class: 'note small', 'data-testid': 'rotation-note' },
      'Rotated: the previous secret keeps working until ', timeEl(k.previous_secret_expires_at), '.');
  }

  /** The four actions of a key; built once per card or row so a poll never replaces them. */
  function keyActions(k, compact) {
    const b = (label, action, iconName, extra = '') => button(label, {
      class: `btn ${compact ? 'small ' : ''}${extra}`, 'data-action': action, 'data-key-id': k.id,
    }, compact ? null : iconName);
    const wrap = h('div', { class: 'key-actions' },
      b('View Traces', 'traces', 'trace'),
      b('Children', 'children', null),
      b('Edit', 'edit', 'edit'),
      b('Rotate', 'rotate', 'rotate'),
      b('Revoke', 'revoke', 'revoke', 'danger-ghost'));
    syncActions(wrap, k);
    return wrap;
  }

  function syncActions(wrap, k) {
    const revoked = k.status === 'revoked';
    for (const btn of wrap.querySelectorAll('button')) {
      if (btn.dataset.action !== 'traces' && btn.dataset.action !== 'children') btn.hidden = revoked;
    }
  }

  function findKey(id) {
    return (state.keys || []).find((k) => k.id === id)
      || (state.keyOptions || []).find((k) => k.id === id) || null;
  }

  /** Key actions on cards and rows (one delegated listener on the document, installed once). */
  async function onKeyAction(btn) {
    {
      const id = btn.dataset.keyId;
      const action = btn.dataset.action;
      if (action === 'traces') {
        navigate('/dashboard/gate/traces?key=' + encodeURIComponent(id));
        return;
      }
      if (action === 'children') {
        toggleChildren(btn, id);
        return;
      }
      let k = findKey(id);
      if (!k) {
        try { k = await api('GET', '/admin/keys/' + encodeURIComponent(id)); } catch (err) { toast(err.message, 'error'); return; }
      }
      if (action === 'edit') openEditDialog(k);
      else if (action === 'rotate') openRotateDialog(k);
      else if (action === 'revoke') openRevokeDialog(k);
    }
  }

  function sortKeys(keys) {
    const rank = { active: 0, expired: 1, revoked: 2 };
    return keys.slice().sort((a, b) => (rank[a.status] ?? 3) - (rank[b.status] ?? 3)
      || String(b.created_at).localeCompare(String(a.created_at)) || a.id.localeCompare(b.id));
  }

  /** Search and status for Keys and Members: both go to the API (`q`, `status`), which pages. */
  function keysToolbar(onChange) {
    const kq = state.keyQuery;
    const search = h('input', {
      type: 'search', class: 'search', name: 'q', placeholder: 'Search name, id, prefix or group',
      'aria-label': 'Search keys', 'data-testid': 'key-search', value: kq.q,
    });
    let timer = null;
    search.addEventListener('input', () => {
      clearTimeout(timer);
      // One request per pause in typing, not one per key stroke.
      timer = setTimeout(() => { kq.q = search.value; kq.offset = 0; onChange(); }, 250);
    });
    const seg = h('div', { class: 'segmented', role: 'radiogroup', 'aria-label': 'Status' });
    for (const st of ['all', 'active', 'expired', 'revoked']) {
      const b = h('button', {
        type: 'button', role: 'radio', class: 'seg', 'data-status': st,
        'aria-checked': String(kq.status === st),
      }, h('span', { text: st[0].toUpperCase() + st.slice(1) }), h('span', { class: 'count', 'data-count': st }));
      b.addEventListener('click', () => {
        kq.status = st;
        kq.offset = 0;
        for (const x of seg.children) x.setAttribute('aria-checked', String(x === b));
        onChange();
      });
      seg.append(b);
    }
    return { el: h('div', { class: 'toolbar' }, search, seg), seg };
  }

  /** The count of matching keys, on the selected status. */
  function updateCounts(seg) {
    for (const st of ['all', 'active', 'expired', 'revoked']) {
      seg.querySelector(`[data-count="${st}"]`).textContent = st === state.keyQuery.status ? int(state.keyTotal) : '';
    }
  }

  /** Previous / next over the API's pages of KEY_PAGE keys. */
  function keysPager(onChange) {
    const info = h('span', { class: 'muted small', 'data-testid': 'page-info' });
    const prev = button('Previous', { class: 'btn small', 'data-action': 'prev-page' }, 'left');
    const next = button('Next', { class: 'btn small', 'data-action': 'next-page' }, 'right');
    const kq = state.keyQuery;
    prev.addEventListener('click', () => { kq.offset = Math.max(0, kq.offset - KEY_PAGE); onChange(); });
    next.addEventListener('click', () => { if (kq.offset + KEY_PAGE < state.keyTotal) { kq.offset += KEY_PAGE; onChange(); } });
    const el = h('div', { class: 'pager keys-pager', 'data-testid': 'pager' }, info, prev, next);
    const sync = () => {
      const n = (state.keys || []).length;
      info.textContent = state.keyTotal
        ? `${int(kq.offset + 1)}–${int(kq.offset + n)} of ${plural(state.keyTotal, 'key')}`
        : '';
      prev.disabled = kq.offset === 0;
      next.disabled = kq.offset + KEY_PAGE >= state.keyTotal;
      el.hidden = state.keyTotal <= KEY_PAGE && kq.offset === 0;
    };
    return { el, sync };
  }

  /** No keys at all (not merely none matching the search). */
  function noKeysYet() {
    return state.keyTotal === 0 && !state.keyQuery.q.trim() && state.keyQuery.status === 'all';
  }

  /** Keys and Members start from `?q=` when a link asks (a parent or child link). */
  function keyQueryFromUrl(params) {
    if (params.has('q')) Object.assign(state.keyQuery, { q: params.get('q') || '', status: 'all', offset: 0 });
  }

  function summaryStrip(keys) {
    // With more keys than one page, the figures are the page's, and say so.
    const partial = state.keyTotal > keys.length;
    const active = keys.filter((k) => k.status === 'active');
    const spend = keys.reduce((a, k) => a + spendOf(k), 0);
    const today = keys.reduce((a, k) => a + ((k.usage && k.usage.requests_today) || 0), 0);
    const inflight = keys.reduce((a, k) => a + ((k.usage && k.usage.requests_in_flight) || 0), 0);
    const stat = (label, value, id) => h('div', { class: 'stat', 'data-testid': id },
      h('div', { class: 'stat-label', text: label }), h('div', { class: 'stat-value', text: value }));
    const on = partial ? ' (this page)' : '';
    return h('div', { class: 'stats' },
      stat(partial ? 'Matching keys' : 'Active keys', int(partial ? state.keyTotal : active.length), 'stat-active'),
      stat('Spend this month' + on, money(spend), 'stat-spend'),
      stat('Requests today' + on, int(today), 'stat-today'),
      stat('In flight' + on, int(inflight), 'stat-inflight'));
  }

  function emptyState(title, text, withCta) {
    return h('div', { class: 'empty-state', 'data-testid': 'empty-state' },
      h('div', { class: 'empty-icon' }, logo()),
      h('h2', { text: title }),
      h('p', { class: 'muted', text }),
      withCta ? button('Connect an agent', { class: 'btn primary', 'data-action': 'connect' }, 'plus') : null);
  }

  const NO_KEYS_TEXT = 'Each agent gets its own key: its own limits, budget, models and traces. '
    + 'Create one, paste the snippet into the agent, and its spend shows up here as it works.';

  function errorBanner(err) {
    return h('div', { class: 'banner error', role: 'alert', text: err.message });
  }

  // ---------------------------------------------------------------- Gate → Keys

  function renderKeys(container, params, ctx) {
    keyQueryFromUrl(params);
    const toolbar = keysToolbar(() => ctx.refresh());
    const pager = keysPager(() => ctx.refresh());
    let stats = h('div', { class: 'stats' });
    const grid = h('div', { class: 'cards', 'data-testid': 'key-cards' });
    const status = h('div', { class: 'page-status' });
    container.append(stats, toolbar.el, status, grid, pager.el);
    const cards = new Map();

    function card(k) {
      const el = h('article', { class: 'card key-card', 'data-key-id': k.id, 'data-status': k.status },
        cardHead(k), cardBody(k), h('div', { class: 'card-actions' }, keyActions(k, false)));
      return el;
    }
    function cardHead(k) {
      return h('header', { class: 'card-head' },
        h('div', { class: 'card-title' },
          h('h3', { class: 'key-name', title: k.name, text: k.name }),
          h('div', { class: 'key-ids' },
            h('code', { class: 'key-display', 'data-testid': 'key-display', text: k.display || `spideriq_pat_${k.prefix}…` }),
            h('span', { class: 'key-id muted', text: k.id }))),
        statusBadge(k));
    }
    function cardBody(k) {
      return h('div', { class: 'card-body' }, spendBlock(k), modelBars(k), limitsList(k), rotationNote(k));
    }

    function draw() {
      const keys = state.keys;
      if (!keys) return;
      stats = patch(stats, summaryStrip(keys));
      updateCounts(toolbar.seg);
      pager.sync();
      if (noKeysYet()) {
        fill(grid);
        cards.clear();
        toolbar.el.hidden = true;
        fill(status, emptyState('Connect your first agent', NO_KEYS_TEXT, true));
        return;
      }
      toolbar.el.hidden = false;
      // The API has searched, filtered, ordered and paged already.
      const shown = keys;
      fill(status, shown.length ? '' : h('p', { class: 'muted center', text: 'No keys match this filter.' }));
      const seen = new Set();
      let prev = null;
      for (const k of shown) {
        seen.add(k.id);
        let el = cards.get(k.id);
        if (!el) {
          el = card(k);
          cards.set(k.id, el);
        } else {
          el.dataset.status = k.status;
          patch(el.querySelector('.card-head'), cardHead(k));
          patch(el.querySelector('.card-body'), cardBody(k));
          syncActions(el.querySelector('.key-actions'), k);
        }
        // Keep DOM order = display order without moving nodes that are already in place.
        const want = prev ? prev.nextSibling : grid.firstChild;
        if (want !== el) grid.insertBefore(el, want);
        prev = el;
      }
      for (const [id, el] of cards) {
        if (!seen.has(id)) { el.remove(); cards.delete(id); }
      }
    }

    ctx.refresh = async () => { await fetchKeys(); if (ctx.alive) draw(); };
    if (state.keys) draw();
    else fill(status, h('p', { class: 'muted center', text: 'Loading keys…' }));
    return poller(async () => {
      try {
        await fetchKeys();
      } catch (e) {
        if (ctx.alive && !state.keys) fill(status, errorBanner(e));
        throw e;
      }
      if (ctx.alive) draw();
    }, POLL_MS, ctx);
  }

  // ---------------------------------------------------------------- Settings → Members → Agents

  function renderMembers(container, params, ctx) {
    keyQueryFromUrl(params);
    const tabs = h('div', { class: 'tabs', role: 'tablist' },
      h('a', { class: 'tab active', role: 'tab', 'aria-selected': 'true', href: '/dashboard/settings/members/agents', 'data-nav': true, text: 'Agents' }));
    const intro = h('p', { class: 'muted intro', text: 'Every agent that can call the gateway, with its limits and this month’s spend. Same keys, same actions as Gate → Keys.' });
    const toolbar = keysToolbar(() => ctx.refresh());
    const pager = keysPager(() => ctx.refresh());
    const tbody = h('tbody');
    const table = h('table', { class: 'table members-table', 'data-testid': 'members-table' },
      h('thead', {}, h('tr', {},
        ['Agent', 'Status', 'Group', 'Parent', 'Limits', 'Models', 'Spend this month', 'Activity', ''].map((t) => h('th', { scope: 'col', text: t })))),
      tbody);
    const status = h('div', { class: 'page-status' });
    const wrap = h('div', { class: 'table-wrap' }, table);
    container.append(tabs, intro, toolbar.el, status, wrap, pager.el);
    const rows = new Map();

    function cells(k) {
      const budget = budgetOf(k);
      const spend = spendOf(k);
      return [
        h('td', { class: 'agent-cell' }, h('div', { class: 'key-name', text: k.name }),
          h('code', { class: 'key-display small', text: k.display || `spideriq_pat_${k.prefix}…` })),
        h('td', {}, statusBadge(k)),
        h('td', { class: 'small' }, groupLink(k.group)),
        h('td', { class: 'small' }, parentLink(k.parent_id)),
        h('td', { class: 'small limits-cell' }, limitSummary(k)),
        h('td', { class: 'small models-cell', text: modelsText(k) }),
        h('td', { class: 'spend-cell' },
          h('div', {}, h('span', { class: 'spend-amount small-amount', 'data-testid': 'spend', text: money(spend) }),
            h('span', { class: 'muted small', text: budget ? ` of ${money(budget)}` : ' · no budget' })),
          bar(budget ? spend / budget : 0, 'spend-bar thin level-' + (!budget ? 'none' : spend / budget >= 1 ? 'over' : spend / budget >= 0.8 ? 'warn' : 'ok'))),
        h('td', { class: 'small nowrap' },
          h('div', {}, k.last_used_at ? timeEl(k.last_used_at, 'relative') : h('span', { class: 'muted', text: 'never used' })),
          h('div', { class: 'muted' }, k.revoked_at ? h('span', {}, 'revoked ', timeEl(k.revoked_at, 'relative'))
            : h('span', {}, new Date(k.expires_at).getTime() < Date.now() ? 'expired ' : 'expires ', timeEl(k.expires_at, 'relative')))),
      ];
    }

    function draw() {
      const keys = state.keys;
      if (!keys) return;
      updateCounts(toolbar.seg);
      pager.sync();
      if (noKeysYet()) {
        wrap.hidden = true;
        toolbar.el.hidden = true;
        fill(status, emptyState('No agents yet', NO_KEYS_TEXT, true));
        return;
      }
      wrap.hidden = false;
      toolbar.el.hidden = false;
      const shown = keys;
      fill(status, shown.length ? '' : h('p', { class: 'muted center', text: 'No keys match this filter.' }));
      const seen = new Set();
      let prev = null;
      for (const k of shown) {
        seen.add(k.id);
        let tr = rows.get(k.id);
        const fresh = cells(k);
        if (!tr) {
          tr = h('tr', { 'data-key-id': k.id, 'data-status': k.status }, fresh, h('td', { class: 'actions-cell' }, keyActions(k, true)));
          rows.set(k.id, tr);
        } else {
          tr.dataset.status = k.status;
          fresh.forEach((td, i) => patch(tr.children[i], td));
          syncActions(tr.querySelector('.key-actions'), k);
        }
        const want = prev ? prev.nextSibling : tbody.firstChild;
        if (want !== tr) tbody.insertBefore(tr, want);
        prev = tr;
      }
      for (const [id, tr] of rows) {
        if (!seen.has(id)) { tr.remove(); rows.delete(id); }
      }
    }

    ctx.refresh = async () => { await fetchKeys(); if (ctx.alive) draw(); };
    if (state.keys) draw();
    return poller(async () => {
      try {
        await fetchKeys();
      } catch (e) {
        if (ctx.alive && !state.keys) fill(status, errorBanner(e));
        throw e;
      }
      if (ctx.alive) draw();
    }, POLL_MS, ctx);
  }

  // ---------------------------------------------------------------- key select (traces, usage)

  function keySelect(selected, onChange, allLabel = 'All keys') {
    const sel = h('select', { name: 'key', class: 'select', 'aria-label': 'Key' });
    const fillOptions = () => {
      const keys = sortKeys(state.keyOptions || []);
      const opts = [h('option', { value: '', text: allLabel })];
      for (const k of keys) {
        opts.push(h('option', { value: k.id, text: `${k.name} (${k.display || k.prefix})${k.status !== 'active' ? ' · ' + k.status : ''}` }));
      }
      if (selected && !keys.some((k) => k.id === selected)) opts.push(h('option', { value: selected, text: selected }));
      const current = sel.value || selected || '';
      fill(sel, ...opts);
      sel.value = current;
    };
    fillOptions();
    sel.addEventListener('change', () => onChange(sel.value));
    fetchKeyOptions().then(fillOptions).catch(() => {});
    return sel;
  }

  // ---------------------------------------------------------------- Gate → Traces

  function renderTraces(container, params, ctx) {
    const keyId = params.get('key') || '';
    const before = params.get('before') || '';
    const history_ = (ctx.pages = []);
    void history_;
    const select = keySelect(keyId, (id) => navigate('/dashboard/gate/traces' + (id ? '?key=' + encodeURIComponent(id) : '')));
    const newer = button('Newer', { class: 'btn small', 'data-action': 'newer' }, 'left');
    const older = button('Older', { class: 'btn small', 'data-action': 'older' }, 'right');
    const liveTag = h('span', { class: 'tag live-tag', text: 'Live' });
    const heading = h('div', { class: 'trace-key' });
    const tbody = h('tbody');
    const table = h('table', { class: 'table traces-table', 'data-testid': 'traces-table' },
      h('thead', {}, h('tr', {},
        ['Time', keyId ? null : 'Key', 'Endpoint', 'Model', 'Status', 'Error', 'Tokens', 'Cost', 'Latency', 'Trace']
          .filter(Boolean).map((t) => h('th', { scope: 'col', text: t, class: ['Tokens', 'Cost', 'Latency'].includes(t) ? 'num' : null })))),
      tbody);
    const status = h('div', { class: 'page-status' });
    const wrap = h('div', { class: 'table-wrap' }, table);
    container.append(
      h('div', { class: 'toolbar' }, h('label', { class: 'inline-field' }, h('span', { class: 'label', text: 'Key' }), select),
        heading, h('div', { class: 'spacer' }), liveTag, h('div', { class: 'pager' }, newer, older)),
      status, wrap);

    let nextBefore = null;
    newer.disabled = !before;
    older.disabled = true;
    liveTag.hidden = !!before;

    const stack = (history.state && history.state.traceStack) || [];
    newer.addEventListener('click', () => {
      const prevBefore = stack.length ? stack[stack.length - 1] : '';
      const url = '/dashboard/gate/traces?' + new URLSearchParams({ ...(keyId ? { key: keyId } : {}), ...(prevBefore ? { before: prevBefore } : {}) });
      history.pushState({ traceStack: stack.slice(0, -1) }, '', url);
      route();
    });
    older.addEventListener('click', () => {
      if (!nextBefore) return;
      const url = '/dashboard/gate/traces?' + new URLSearchParams({ ...(keyId ? { key: keyId } : {}), before: nextBefore });
      history.pushState({ traceStack: [...stack, before] }, '', url);
      route();
    });

    const keyName = (id) => { const k = findKey(id); return k ? k.name : id || '—'; };

    function row(t) {
      const served = t.served_model && t.served_model !== t.requested_model ? t.served_model : null;
      const st = Number(t.status) || 0;
      const tokens = (t.prompt_tokens || 0) + (t.completion_tokens || 0);
      return h('tr', {
        'data-testid': 'trace-row', 'data-trace-id': t.id ?? null, 'data-ts': t.ts_ms ?? null,
        class: st >= 400 ? 'is-error' : null,
      },
        h('td', { class: 'nowrap' }, timeEl(t.time || (t.ts_ms ? new Date(t.ts_ms).toISOString() : null), 'trace')),
        keyId ? null : h('td', { class: 'small nowrap key-cell' }, t.key_id
          ? h('a', { href: '/dashboard/gate/traces?key=' + encodeURIComponent(t.key_id), 'data-nav': true, text: keyName(t.key_id) })
          : h('span', { class: 'muted', text: 'no key' })),
        h('td', {}, h('code', { class: 'small', text: t.endpoint || '—' })),
        h('td', { class: 'model-cell', title: t.provider ? `provider: ${t.provider}` : null },
          h('span', { 'data-testid': 'requested-model', text: t.requested_model || '—' }),
          served ? h('span', { class: 'muted' }, ' → ', h('span', { 'data-testid': 'served-model', text: served })) : null,
          t.fallback_from ? h('span', { class: 'tag warn small', title: `fell back from ${t.fallback_from}`, text: 'fallback' }) : null),
        h('td', {}, h('span', { class: 'badge http-' + (st >= 500 ? '5xx' : st >= 400 ? '4xx' : '2xx'), text: String(t.status ?? '—') })),
        h('td', {}, t.error_code ? h('code', { class: 'small danger-text', text: t.error_code }) : h('span', { class: 'muted', text: '—' })),
        h('td', { class: 'num', title: `${int(t.prompt_tokens || 0)} prompt + ${int(t.completion_tokens || 0)} completion = ${int(tokens)}${t.usage_estimated ? ' (estimated)' : ''}` },
          `${int(t.prompt_tokens || 0)} → ${int(t.completion_tokens || 0)}`, t.usage_estimated ? h('span', { class: 'muted', text: ' ≈' }) : null),
        h('td', { class: 'num', title: t.unit ? `charged per ${t.unit}` : null }, money(t.cost_usd || 0),
          t.unit && t.unit !== 'token'
            ? h('span', { class: 'muted small', 'data-testid': 'trace-unit', text: ` (${int(t.units || 0)} ${t.unit === 'ms' ? 'ms of audio' : t.unit + (t.units === 1 ? '' : 's')})` })
            : null),
        h('td', { class: 'num', title: t.ttfb_ms !== null && t.ttfb_ms !== undefined ? `first byte after ${int(t.ttfb_ms)} ms` : null },
          t.latency_ms !== null && t.latency_ms !== undefined ? `${int(t.latency_ms)} ms` : '—'),
        // The W3C trace id: search for it in Jaeger, Tempo or Honeycomb to see the agent's spans.
        h('td', { class: 'small nowrap' }, t.trace_id
          ? h('code', { 'data-testid': 'trace-id', class: 'small', title: `trace ${t.trace_id}`, text: t.trace_id.slice(0, 12) + '…' })
          : h('span', { class: 'muted', text: '—' })));
    }

    async function load() {
      if (!state.keyOptions && !keyId) await fetchKeyOptions().catch(() => {}); // names for the Key column
      const q = new URLSearchParams({ limit: String(TRACE_PAGE) });
      if (keyId) q.set('key', keyId);
      if (before) q.set('before', before);
      const data = await api('GET', '/admin/traces?' + q);
      if (!ctx.alive) return;
      setLive(true);
      const list = (data && data.data) || [];
      nextBefore = data && data.next_before ? String(data.next_before) : null;
      // Older is possible when the API says so (or, without next_before, when the page is full).
      if (!nextBefore && data && !('next_before' in data) && list.length === TRACE_PAGE) nextBefore = String(list[list.length - 1].id);
      older.disabled = !nextBefore;
      const k = keyId ? findKey(keyId) : null;
      fill(heading, keyId
        ? h('span', {}, k ? h('strong', { text: k.name }) : null, ' ', h('code', { class: 'muted small', text: keyId }))
        : h('span', { class: 'muted', text: 'Every key, newest first' }));
      if (!list.length) {
        wrap.hidden = true;
        fill(status, emptyState(before ? 'No older traces' : 'No traces yet',
          keyId ? 'Requests made with this key appear here about a second after they finish. Paste its snippet into an agent, or send a test request with curl.'
            : 'Every request that reaches the gateway leaves a trace here, rejected ones included.', false));
        fill(tbody);
        return;
      }
      wrap.hidden = false;
      fill(status);
      // Rows that did not change keep their nodes (no flicker while the page follows new traces).
      const existing = [...tbody.children];
      const fresh = list.map((t) => {
        const r = row(t);
        return existing.find((old) => old.isEqualNode(r)) || r;
      });
      fill(tbody, ...fresh);
    }

    // The newest page follows new requests; older pages stay put.
    return before ? (load().catch((e) => { if (e.status !== 401) fill(status, errorBanner(e)); }), null)
      : poller(async () => {
        try { await load(); } catch (e) { if (ctx.alive && e.status !== 401) fill(status, errorBanner(e)); throw e; }
      }, POLL_MS, ctx);
  }

  // ---------------------------------------------------------------- Gate → Alerts

  // ---------------------------------------------------------------- Gate → Usage

  function thisMonth() {
    return new Date().toISOString().slice(0, 7);
  }

  function shiftMonth(month, delta) {
    const [y, m] = month.split('-').map(Number);
    const d = new Date(Date.UTC(y, m - 1 + delta, 1));
    return d.toISOString().slice(0, 7);
  }

  function monthLabel(month) {
    const [y, m] = month.split('-').map(Number);
    return new Intl.DateTimeFormat(undefined, { month: 'long', year: 'numeric', timeZone: 'UTC' })
      .format(new Date(Date.UTC(y, m - 1, 1)));
  }

  function niceStep(max, ticks) {
    const raw = max / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const n = raw / mag;
    return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 2.5 ? 2.5 : n <= 5 ? 5 : 10) * mag;
  }

  function renderUsage(container, params, ctx) {
    let month = /^\d{4}-\d{2}$/.test(params.get('month') || '') ? params.get('month') : thisMonth();
    let keyId = params.get('key') || '';
    const setUrl = () => {
      const q = new URLSearchParams();
      if (month !== thisMonth()) q.set('month', month);
      if (keyId) q.set('key', keyId);
      history.replaceState(null, '', '/dashboard/gate/usage' + (q.toString() ? '?' + q : ''));
    };
    const label = h('span', { class: 'month-label', 'data-testid': 'month', text: monthLabel(month) });
    const prev = button('', { class: 'btn icon-only small', 'aria-label': 'Previous month', 'data-action': 'prev-month' }, 'left');
    const next = button('', { class: 'btn icon-only small', 'aria-label': 'Next month', 'data-action': 'next-month' }, 'right');
    const select = keySelect(keyId, (id) => { keyId = id; setUrl(); load(); });
    const stats = h('div', { class: 'stats' });
    const chartBox = h('div', { class: 'chart', 'data-testid': 'usage-chart' });
    const legend = h('div', { class: 'legend' });
    const tooltip = h('div', { class: 'tooltip', hidden: true, role: 'tooltip' });
    const table = h('div', { class: 'usage-table' });
    container.append(
      h('div', { class: 'toolbar' },
        h('div', { class: 'month-nav' }, prev, label, next),
        h('label', { class: 'inline-field' }, h('span', { class: 'label', text: 'Key' }), select)),
      stats,
      h('div', { class: 'panel chart-panel' },
        h('div', { class: 'panel-head' }, h('h2', { text: 'Spend per day, by model' }), legend),
        chartBox, tooltip),
      table);
    prev.addEventListener('click', () => { month = shiftMonth(month, -1); label.textContent = monthLabel(month); setUrl(); load(); });
    next.addEventListener('click', () => { month = shiftMonth(month, 1); label.textContent = monthLabel(month); setUrl(); load(); });
    next.disabled = month >= thisMonth();

    let data = null;
    let seq = 0;
    async function load() {
      next.disabled = month >= thisMonth();
      const mine = ++seq;
      const q = new URLSearchParams({ month });
      if (keyId) q.set('key', keyId);
      try {
        const d = await api('GET', '/admin/usage/daily?' + q);
        if (!ctx.alive || mine !== seq) return;
        data = d;
        draw();
      } catch (e) {
        if (ctx.alive && e.status !== 401) fill(chartBox, errorBanner(e));
      }
    }

    function draw() {
      if (!data) return;
      const days = data.days || [];
      const series = data.series || {};
      const models = Object.keys(series)
        .map((m) => ({ m, total: (series[m] || []).reduce((a, v) => a + (Number(v) || 0), 0) }))
        .filter((x) => x.total > 0)
        .sort((a, b) => b.total - a.total || a.m.localeCompare(b.m));
      for (const { m } of models) colorClass(m);
      const totals = days.map((_, i) => models.reduce((a, { m }) => a + (Number(series[m][i]) || 0), 0));
      const total = totals.reduce((a, v) => a + v, 0);
      const today = new Date().toISOString().slice(0, 10);
      const elapsed = days.filter((d) => d <= today).length || days.length;
      let busiest = -1;
      totals.forEach((v, i) => { if (v > 0 && (busiest < 0 || v > totals[busiest])) busiest = i; });
      const stat = (l, v, sub) => h('div', { class: 'stat' }, h('div', { class: 'stat-label', text: l }),
        h('div', { class: 'stat-value', text: v }), sub ? h('div', { class: 'stat-sub muted small', text: sub }) : null);
      fill(stats, 
        stat('Spend in ' + monthLabel(month), money(total), keyId ? (findKey(keyId) || {}).name || keyId : 'all keys'),
        stat('Daily average', money(elapsed ? total / elapsed : 0), `over ${plural(elapsed, 'day')}`),
        stat('Busiest day', busiest >= 0 ? money(totals[busiest]) : '—', busiest >= 0 ? dayLabel(days[busiest]) : 'no spend yet'),
        stat('Models used', int(models.length), models.length ? models[0].m + ' leads' : null));
      stats.dataset.testid = 'usage-stats';

      fill(legend, ...models.map(({ m, total: t }) => h('span', { class: 'legend-item', 'data-model': m },
        s('svg', { class: 'swatch ' + colorClass(m), viewBox: '0 0 10 10', 'aria-hidden': 'true' }, s('rect', { width: 10, height: 10, rx: 2 })),
        h('span', { text: m }), h('span', { class: 'muted', text: money(t) }))));

      fill(chartBox, chart(days, models.map((x) => x.m), series, totals, today));

      fill(table, models.length
        ? h('div', { class: 'panel' }, h('table', { class: 'table compact' },
          h('thead', {}, h('tr', {}, h('th', { text: 'Model' }), h('th', { class: 'num', text: 'Spend' }), h('th', { class: 'num', text: 'Share' }), h('th', { text: '' }))),
          h('tbody', {}, models.map(({ m, total: t }) => h('tr', { 'data-model': m },
            h('td', {}, h('span', { class: 'dot ' + colorClass(m) }), ' ', m),
            h('td', { class: 'num', text: money(t) }),
            h('td', { class: 'num', text: total ? `${(t / total * 100).toFixed(1)}%` : '—' }),
            h('td', { class: 'share-cell' }, bar(total ? t / total : 0, 'model-bar ' + colorClass(m))))))))
        : '');
    }

    function dayLabel(day) {
      const [y, m, d] = day.split('-').map(Number);
      return new Intl.DateTimeFormat(undefined, { weekday: 'short', month: 'short', day: 'numeric', timeZone: 'UTC' })
        .format(new Date(Date.UTC(y, m - 1, d)));
    }

    function chart(days, models, series, totals, today) {
      const W = Math.max(560, Math.floor(chartBox.clientWidth || 900));
      const H = 300;
      const pad = { l: 64, r: 12, t: 14, b: 30 };
      const iw = W - pad.l - pad.r;
      const ih = H - pad.t - pad.b;
      const maxTotal = Math.max(0, ...totals);
      const step = maxTotal > 0 ? niceStep(maxTotal, 4) : 0.01;
      const top = maxTotal > 0 ? Math.ceil(maxTotal / step) * step : step * 4;
      const y = (v) => pad.t + ih - (v / top) * ih;
      const band = iw / Math.max(1, days.length);
      const bw = Math.max(3, Math.min(28, band * 0.66));
      const svg = s('svg', {
        class: 'chart-svg', viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img',
        'aria-label': `Spend per day in ${monthLabel(month)}, stacked by model`,
      });
      // grid and y axis
      for (let v = 0; v <= top + step / 2; v += step) {
        const yy = y(v);
        svg.append(s('line', { class: 'grid', x1: pad.l, x2: W - pad.r, y1: yy, y2: yy }));
        svg.append(s('text', { class: 'axis', x: pad.l - 8, y: yy + 4, 'text-anchor': 'end' }, moneyAxis(Number(v.toPrecision(6)))));
      }
      const every = band >= 24 ? 1 : band >= 12 ? 2 : 5;
      days.forEach((day, i) => {
        const x0 = pad.l + i * band;
        const g = s('g', { class: 'day' + (day === today ? ' today' : '') + (day > today ? ' future' : ''), 'data-day': day });
        g.append(s('rect', { class: 'hover-col', x: x0, y: pad.t, width: band, height: ih }));
        let acc = 0;
        for (const m of models) {
          const v = Number(series[m][i]) || 0;
          if (v <= 0) continue;
          const y1 = y(acc + v);
          const y0 = y(acc);
          g.append(s('rect', {
            class: 'seg-rect ' + colorClass(m), 'data-model': m, 'data-testid': 'chart-bar',
            x: (x0 + (band - bw) / 2).toFixed(2), y: y1.toFixed(2), width: bw.toFixed(2),
            height: Math.max(1, y0 - y1).toFixed(2),
          }));
          acc += v;
        }
        const dnum = Number(day.slice(8));
        if ((dnum - 1) % every === 0 || day === today) {
          g.append(s('text', { class: 'axis' + (day === today ? ' today-label' : ''), x: x0 + band / 2, y: H - 10, 'text-anchor': 'middle' }, String(dnum)));
        }
        g.addEventListener('mouseenter', () => showTip(g, day, i, models, series, totals));
        g.addEventListener('mouseleave', () => { tooltip.hidden = true; });
        svg.append(g);
      });
      svg.append(s('line', { class: 'baseline', x1: pad.l, x2: W - pad.r, y1: y(0), y2: y(0) }));
      const frag = [svg];
      if (!models.length) {
        frag.push(h('div', { class: 'chart-empty' },
          h('strong', { text: 'No spend in ' + monthLabel(month) + ' yet' }),
          h('span', { class: 'muted', text: 'Bars appear as agents make paid requests; free models cost $0.00.' })));
      }
      return frag;
    }

    function showTip(g, day, i, models, series, totals) {
      const rows = models.map((m) => [m, Number(series[m][i]) || 0]).filter(([, v]) => v > 0);
      fill(tooltip, 
        h('div', { class: 'tip-title', text: dayLabel(day) }),
        h('div', { class: 'tip-total', text: money(totals[i]) }),
        rows.length ? rows.map(([m, v]) => h('div', { class: 'tip-row' }, h('span', { class: 'dot ' + colorClass(m) }), h('span', { text: m }), h('span', { class: 'tip-val', text: money(v) })))
          : h('div', { class: 'muted small', text: 'no spend' }));
      tooltip.hidden = false;
      const box = chartBox.parentElement.getBoundingClientRect();
      const r = g.getBoundingClientRect();
      // CSSOM positioning (allowed by the CSP, unlike style attributes in markup).
      const left = Math.min(box.width - tooltip.offsetWidth - 8, Math.max(8, r.left - box.left + r.width / 2 - tooltip.offsetWidth / 2));
      tooltip.style.left = left + 'px';
      tooltip.style.top = Math.max(8, r.top - box.top + 24) + 'px';
    }

    let resizeTimer = null;
    const onResize = () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(draw, 120); };
    window.addEventListener('resize', onResize);
    fill(chartBox, h('p', { class: 'muted center', text: 'Loading usage…' }));
    load();
    // Today's bar keeps growing while the page is open.
    const timer = setInterval(() => { if (month === thisMonth()) load(); }, 10000);
    return () => { window.removeEventListener('resize', onResize); clearInterval(timer); clearTimeout(resizeTimer); };
  }

  // ---------------------------------------------------------------- dialogs

  /** A modal <dialog> that is removed from the DOM when it closes (taking any secret with it). */
  function modal(title, { wide = false, testid } = {}) {
    const body = h('div', { class: 'dialog-body' });
    const closeBtn = h('button', { type: 'button', class: 'btn ghost icon-only close-x', 'aria-label': 'Close' }, icon('revoke'));
    const titleEl = h('h2', { class: 'dialog-title', text: title });
    const dlg = h('dialog', { class: 'dialog' + (wide ? ' wide' : ''), 'data-testid': testid || null, 'aria-labelledby': 'dlg-title' },
      h('header', { class: 'dialog-head' }, titleEl, closeBtn), body);
    titleEl.id = 'dlg-title';
    closeBtn.addEventListener('click', () => dlg.close());
    dlg.addEventListener('close', () => {
      fill(body); // the secret, if any, leaves the DOM here
      dlg.remove();
    });
    document.body.append(dlg);
    dlg.showModal();
    return { dlg, body, titleEl, close: () => dlg.close() };
  }

  function field(name, label, input, hint) {
    input.name = name;
    input.id = 'f-' + name;
    return h('div', { class: 'field', 'data-field': name },
      h('label', { for: input.id, class: 'label', text: label }),
      input,
      hint ? h('p', { class: 'hint', text: hint }) : null,
      h('p', { class: 'field-error', 'data-error-for': name, role: 'alert', hidden: true }));
  }

  const textInput = (attrs = {}) => h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', ...attrs });
  const numInput = (attrs = {}) => textInput({ inputmode: 'numeric', placeholder: 'unlimited', ...attrs });

  function clearErrors(form) {
    for (const p of form.querySelectorAll('.field-error')) { p.textContent = ''; p.hidden = true; }
    for (const i of form.querySelectorAll('[aria-invalid]')) i.removeAttribute('aria-invalid');
    const top = form.querySelector('[data-testid=form-error]');
    if (top) { top.textContent = ''; top.hidden = true; }
  }

  /** Shows the API's message next to the field named by its `param`, or at the top. */
  function showError(form, err) {
    const fieldName = err.param ? (PARAM_TO_FIELD[err.param] || err.param) : null;
    const p = fieldName ? form.querySelector(`[data-error-for="${CSS.escape(fieldName)}"]`) : null;
    if (p) {
      p.textContent = err.message;
      p.hidden = false;
      const input = form.querySelector(`[name="${CSS.escape(fieldName)}"]`);
      if (input) { input.setAttribute('aria-invalid', 'true'); input.focus(); }
      return;
    }
    const top = form.querySelector('[data-testid=form-error]');
    top.textContent = err.message;
    top.hidden = false;
  }

  /** Numbers go to the API as numbers; anything else as typed, so the API says what is wrong. */
  function numberOrRaw(s, money_ = false) {
    let v = String(s).trim();
    if (money_) v = v.replace(/^\$/, '').replace(/,/g, '');
    if (v === '') return undefined;
    return /^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(v) ? Number(v) : v;
  }

  function list(s) {
    return String(s).split(',').map((x) => x.trim()).filter(Boolean);
  }

  function modelPicker(input) {
    const names = [
      ...((state.info && state.info.aliases) || []).map((a) => (typeof a === 'string' ? a : a.id || a.name)),
      ...((state.info && state.info.models) || []).map((m) => (typeof m === 'string' ? m : m.id)),
    ].filter(Boolean);
    if (!names.length) return null;
    const free = new Set(((state.info && state.info.models) || []).filter((m) => m && m.free).map((m) => m.id));
    const chips = h('div', { class: 'chips', 'aria-label': 'Add a model' });
    const sync = () => {
      const cur = new Set(list(input.value));
      for (const c of chips.children) c.setAttribute('aria-pressed', String(cur.has(c.dataset.model)));
    };
    for (const n of names) {
      const c = h('button', { type: 'button', class: 'chip', 'data-model': n, 'aria-pressed': 'false' },
        n, free.has(n) ? h('span', { class: 'chip-tag', text: 'free' }) : null);
      c.addEventListener('click', () => {
        const cur = list(input.value);
        const i = cur.indexOf(n);
        if (i >= 0) cur.splice(i, 1); else cur.push(n);
        input.value = cur.join(', ');
        sync();
      });
      chips.append(c);
    }
    input.addEventListener('input', sync);
    sync();
    return chips;
  }

  function keyForm(k, mode) {
    const v = (x) => (x === null || x === undefined ? '' : String(x));
    const budgetMode = h('select', { class: 'select' },
      h('option', { value: 'hard', text: 'hard: refuse requests over budget' }),
      h('option', { value: 'soft', text: 'soft: allow and flag' }));
    budgetMode.value = (k && k.budget_mode) || 'hard';
    const models = textInput({ placeholder: 'all models', value: k ? (k.allowed_models || []).join(', ') : '' });
    const freeOnly = h('input', { type: 'checkbox', checked: !!(k && k.free_only) });
    freeOnly.name = 'free_only';
    freeOnly.id = 'f-free_only';
    const picker = modelPicker(models);
    const group = groupSelect(k ? k.group : null);
    const form = h('form', { class: 'key-form', novalidate: true, autocomplete: 'off' },
      h('p', { class: 'banner error', 'data-testid': 'form-error', role: 'alert', hidden: true }),
      h('div', { class: 'grid-2' },
        field('name', 'Name', textInput({ placeholder: 'e.g. research-agent', value: k ? k.name : '' }), mode === 'create' ? 'Shown in traces and usage; not secret.' : null),
        mode === 'create'
          ? field('ttl', 'Expires after', textInput({ value: '30d', placeholder: '30d' }), 'From 1h to 90d (s, m, h, d, w).')
          : field('ttl', 'New expiry', textInput({ placeholder: 'unchanged (e.g. 30d from now)' }), `Now expires ${k && k.expires_at ? new Date(k.expires_at).toLocaleString() : 'never'}.`)),
      h('fieldset', { class: 'group' }, h('legend', { text: 'Limits' }),
        h('div', { class: 'grid-3' },
          field('rpm', 'Requests / minute', numInput({ value: v(k && k.rpm) })),
          field('rpd', 'Requests / day', numInput({ value: v(k && k.rpd) })),
          field('max_inflight', 'Max in flight', numInput({ value: v(k && k.max_inflight) })))),
      h('fieldset', { class: 'group' }, h('legend', { text: 'Runaway-agent brakes' }),
        h('div', { class: 'grid-2' },
          field('max_usd_per_hour', 'Max spend per hour (USD)', textInput({ inputmode: 'decimal', placeholder: 'no cap', value: v(k && k.max_usd_per_hour) }), 'Over any rolling 60 minutes, requests in flight included.'),
          field('loop_limit', 'Same request per minute', numInput({ value: v(k && k.loop_limit) }), 'More identical requests within 60 s get 429 loop_detected.'))),
      h('fieldset', { class: 'group' }, h('legend', { text: 'Budget' }),
        h('div', { class: 'grid-2' },
          field('budget', 'Monthly budget (USD)', textInput({ inputmode: 'decimal', placeholder: 'no budget', value: v(k && k.monthly_budget_usd) })),
          field('budget_mode', 'When the budget is spent', budgetMode)),
        field('group', 'Group', group, 'Its spend and requests also count against the group’s budget and rpm.')),
      h('fieldset', { class: 'group' }, h('legend', { text: 'Models' }),
        field('models', 'Allowed models and aliases', models, 'Comma-separated; empty allows every model.'),
        picker,
        h('div', { class: 'check' }, freeOnly, h('label', { for: 'f-free_only', text: 'Free models only' }),
          h('p', { class: 'field-error', 'data-error-for': 'free_only', role: 'alert', hidden: true }))),
      h('details', { class: 'advanced', open: mode === 'edit' && k && ((k.scopes || []).join(',') !== 'gate:chat,gate:models,gate:usage' || k.client_id) ? true : null },
        h('summary', { text: 'Advanced' }),
        h('div', { class: 'grid-2' },
          field('scopes', 'Scopes', textInput({ placeholder: 'gate:chat, gate:models, gate:usage', value: k ? (k.scopes || []).join(', ') : '' }),
            mode === 'edit' ? 'Comma-separated; empty leaves them unchanged.' : 'Comma-separated; empty means the defaults.'),
          field('client_id', 'Client id', textInput({ placeholder: 'optional', value: k ? v(k.client_id) : '' })))));
    return form;
  }

  function readForm(form) {
    const val = (n) => {
      const el = form.elements.namedItem(n);
      return el ? el.value : '';
    };
    return {
      name: val('name').trim(),
      rpm: numberOrRaw(val('rpm')),
      rpd: numberOrRaw(val('rpd')),
      max_inflight: numberOrRaw(val('max_inflight')),
      max_usd_per_hour: numberOrRaw(val('max_usd_per_hour'), true),
      loop_limit: numberOrRaw(val('loop_limit')),
      monthly_budget_usd: numberOrRaw(val('budget'), true),
      budget_mode: val('budget_mode'),
      allowed_models: list(val('models')),
      free_only: form.elements.namedItem('free_only').checked,
      scopes: list(val('scopes')),
      ttl: val('ttl').trim(),
      client_id: val('client_id').trim(),
      group: val('group'),
    };
  }

  /** A select of the groups (GET /admin/groups), with "No group" first. */
  function groupSelect(current) {
    const sel = h('select', { class: 'select' });
    const fillOptions = () => {
      const names = (state.groups || []).map((g) => g.name);
      if (current && !names.includes(current)) names.push(current);
      const keep = sel.value || current || '';
      fill(sel, h('option', { value: '', text: 'No group' }),
        names.map((n) => h('option', { value: n, text: n })));
      sel.value = keep;
    };
    fillOptions();
    fetchGroups().then(fillOptions).catch(() => {});
    return sel;
  }

  function busy(btn, on, label) {
    btn.disabled = on;
    if (label) btn.querySelector('span') ? (btn.querySelector('span').textContent = label) : (btn.textContent = label);
  }

  /** After a change made here, redraw at once instead of waiting for the next poll. */
  async function refreshKeysSoon() {
    try {
      if (state.ctx && state.ctx.alive && state.ctx.refresh) await state.ctx.refresh();
      else await fetchKeys();
    } catch (e) { /* the poller retries */ }
  }

  function openConnectDialog() {
    const m = modal('Connect an agent', { wide: true, testid: 'connect-dialog' });
    const form = keyForm(null, 'create');
    const create = h('button', { type: 'submit', class: 'btn primary', text: 'Create' });
    const cancel = h('button', { type: 'button', class: 'btn', text: 'Cancel' });
    cancel.addEventListener('click', () => m.close());
    form.append(h('footer', { class: 'dialog-foot' },
      h('p', { class: 'muted small', text: 'The secret is shown once, right after creation.' }), cancel, create));
    m.body.append(h('p', { class: 'muted intro', text: 'Create a key for one agent. Every limit is optional; leave a field empty for unlimited.' }), form);
    form.elements.namedItem('name').focus();
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      clearErrors(form);
      const f = readForm(form);
      const body = { name: f.name, budget_mode: f.budget_mode, free_only: f.free_only };
      for (const k of ['rpm', 'rpd', 'max_inflight', 'monthly_budget_usd', 'max_usd_per_hour', 'loop_limit']) if (f[k] !== undefined) body[k] = f[k];
      if (f.allowed_models.length) body.allowed_models = f.allowed_models;
      if (f.scopes.length) body.scopes = f.scopes;
      if (f.ttl) body.ttl = f.ttl;
      if (f.client_id) body.client_id = f.client_id;
      if (f.group) body.group = f.group;
      busy(create, true, 'Creating…');
      try {
        const key = await api('POST', '/admin/keys', body);
        showSecret(m, key, 'created');
        refreshKeysSoon();
      } catch (err) {
        busy(create, false, 'Create');
        if (err.status !== 401) showError(form, err);
      }
    });
  }

  function snippets(secret, key) {
    const base = publicUrl();
    const infoModels = (state.info && state.info.models) || [];
    const allowed = key.allowed_models || [];
    // A model of `endpoint`'s family the key may call: from its allow-list, else the config.
    const ofFamily = (endpoint) => {
      const family = infoModels.filter((m) => (m.endpoint || 'chat') === endpoint).map((m) => m.id);
      return allowed.find((a) => family.includes(a)) || (allowed.length ? null : family[0]) || null;
    };
    const model = ofFamily('chat') || allowed[0]
      || ((state.info && state.info.aliases) || [])[0]
      || (infoModels[0] || {}).id || 'gpt-4o-mini';
    const modelName = typeof model === 'string' ? model : model.id || model.name;
    const imageModel = ofFamily('images') || 'gpt-image-1';
    return [
      ['openai', 'OpenAI Python', [
        'from openai import OpenAI',
        '',
        'client = OpenAI(',
        `    base_url="${base}/v1",`,
        `    api_key="${secret}",`,
        ')',
        'reply = client.chat.completions.create(',
        `    model="${modelName}",`,
        '    messages=[{"role": "user", "content": "Hello!"}],',
        ')',
        'print(reply.choices[0].message.content)',
      ].join('\n')],
      ['anthropic', 'Anthropic Python', [
        'import anthropic',
        '',
        'client = anthropic.Anthropic(',
        `    base_url="${base}",`,
        `    api_key="${secret}",`,
        ')',
      ].join('\n')],
      ['claude-code', 'Claude Code', [
        `export ANTHROPIC_BASE_URL="${base}"`,
        `export ANTHROPIC_AUTH_TOKEN="${secret}"`,
        `# or: export ANTHROPIC_API_KEY="${secret}"`,
        'claude',
      ].join('\n')],
      ['images', 'Images (Python)', [
        'import base64',
        'from openai import OpenAI',
        '',
        `client = OpenAI(base_url="${base}/v1", api_key="${secret}")`,
        'result = client.images.generate(',
        `    model="${imageModel}",`,
        '    prompt="A lighthouse at dawn, watercolour",',
        '    n=1,',
        ')',
        'image = result.data[0]',
        'if image.b64_json:',
        '    open("image.png", "wb").write(base64.b64decode(image.b64_json))',
        'else:',
        '    print(image.url)',
      ].join('\n')],
      ['curl', 'curl', [
        `curl ${base}/v1/chat/completions \\`,
        `  -H "Authorization: Bearer ${secret}" \\`,
        '  -H "Content-Type: application/json" \\',
        `  -d '{"model": "${modelName}", "messages": [{"role": "user", "content": "Hello!"}]}'`,
      ].join('\n')],
    ];
  }

  async function copyText(text, btn, el) {
    let ok = false;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(text);
        ok = true;
      }
    } catch (e) { ok = false; }
    if (!ok && el) {
      // Fallback: select the element's text and use the legacy copy command.
      const range = document.createRange();
      range.selectNodeContents(el);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    }
    const span = btn.querySelector('span') || btn;
    const before = span.textContent;
    span.textContent = ok ? 'Copied' : 'Press Ctrl+C';
    btn.classList.toggle('copied', ok);
    setTimeout(() => { if (btn.isConnected) { span.textContent = before; btn.classList.remove('copied'); } }, 1800);
  }

  /** The one place a secret is ever put in the DOM; the dialog removes it when it closes. */
  function showSecret(m, key, how) {
    const secret = key.secret;
    m.titleEl.textContent = how === 'rotated' ? `New secret for ${key.name}` : `${key.name} is connected`;
    const code = h('code', { class: 'secret', 'data-testid': 'secret', text: secret });
    const copy = button('Copy', { class: 'btn primary', 'data-action': 'copy-secret' }, 'copy');
    copy.addEventListener('click', () => copyText(secret, copy, code));
    const tabs = h('div', { class: 'tabs', role: 'tablist' });
    const panes = h('div', { class: 'snippet-panes' });
    snippets(secret, key).forEach(([id, label, text], i) => {
      const tab = h('button', { type: 'button', role: 'tab', class: 'tab' + (i === 0 ? ' active' : ''), 'aria-selected': String(i === 0), 'data-snippet': id, text: label });
      const pre = h('pre', { class: 'snippet' }, h('code', { 'data-testid': 'snippet-' + id, text }));
      const cp = button('Copy', { class: 'btn small copy-snippet' }, 'copy');
      cp.addEventListener('click', () => copyText(text, cp, pre));
      const pane = h('div', { class: 'snippet-pane', 'data-snippet': id, hidden: i !== 0 }, pre, cp);
      tab.addEventListener('click', () => {
        for (const t of tabs.children) { const on = t === tab; t.classList.toggle('active', on); t.setAttribute('aria-selected', String(on)); }
        for (const p of panes.children) p.hidden = p !== pane;
      });
      tabs.append(tab);
      panes.append(pane);
    });
    const done = h('button', { type: 'button', class: 'btn primary', text: 'Done' });
    done.addEventListener('click', () => m.close());
    const grace = key.previous_secret_expires_at;
    fill(m.body, 
      h('div', { class: 'banner warn', 'data-testid': 'secret-warning' },
        h('strong', { text: 'Copy this secret now. ' }),
        'It is shown only this once: SpiderGate keeps just its hash and cannot show it again.'),
      h('div', { class: 'secret-box' }, code, copy),
      how === 'rotated' && grace
        ? h('p', { class: 'note small' }, 'The previous secret keeps working until ', timeEl(grace), '.')
        : null,
      h('dl', { class: 'facts' },
        h('div', {}, h('dt', { text: 'Key id' }), h('dd', {}, h('code', { text: key.id }))),
        h('div', {}, h('dt', { text: 'Gateway' }), h('dd', {}, h('code', { 'data-testid': 'public-url', text: publicUrl() }))),
        h('div', {}, h('dt', { text: 'Expires' }), h('dd', {}, timeEl(key.expires_at)))),
      h('h3', { class: 'section-title', text: 'Paste into your agent' }),
      tabs, panes,
      h('footer', { class: 'dialog-foot' }, h('span', { class: 'spacer' }), done));
    m.dlg.scrollTop = 0;
    done.focus({ preventScroll: true });
  }

  function openEditDialog(k) {
    const m = modal(`Edit ${k.name}`, { wide: true, testid: 'edit-dialog' });
    const form = keyForm(k, 'edit');
    const save = h('button', { type: 'submit', class: 'btn primary', text: 'Save' });
    const cancel = h('button', { type: 'button', class: 'btn', text: 'Cancel' });
    cancel.addEventListener('click', () => m.close());
    form.append(h('footer', { class: 'dialog-foot' }, h('span', { class: 'spacer' }), cancel, save));
    m.body.append(form);
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      clearErrors(form);
      const f = readForm(form);
      // Only the fields that changed are sent, so a concurrent change to another field survives.
      const body = {};
      const same = (a, b) => JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
      if (f.name !== k.name) body.name = f.name;
      for (const n of ['rpm', 'rpd', 'max_inflight', 'monthly_budget_usd', 'max_usd_per_hour', 'loop_limit']) {
        const want = f[n] === undefined ? null : f[n];
        if (!same(want, k[n])) body[n] = want;
      }
      if (f.budget_mode !== k.budget_mode) body.budget_mode = f.budget_mode;
      if (!same(f.allowed_models, k.allowed_models || [])) body.allowed_models = f.allowed_models;
      if (f.free_only !== !!k.free_only) body.free_only = f.free_only;
      if (f.scopes.length && !same(f.scopes, k.scopes || [])) body.scopes = f.scopes;
      if (f.ttl) body.ttl = f.ttl;
      if ((f.client_id || null) !== (k.client_id || null)) body.client_id = f.client_id || null;
      if ((f.group || null) !== (k.group || null)) body.group = f.group || null;
      if (!Object.keys(body).length) { m.close(); toast('Nothing changed.'); return; }
      busy(save, true, 'Saving…');
      try {
        await api('PATCH', '/admin/keys/' + encodeURIComponent(k.id), body);
        m.close();
        toast(`Saved ${f.name || k.name}.`);
        refreshKeysSoon();
      } catch (err) {
        busy(save, false, 'Save');
        if (err.status !== 401) showError(form, err);
      }
    });
  }

  function openRotateDialog(k) {
    const m = modal(`Rotate ${k.name}`, { testid: 'rotate-dialog' });
    const form = h('form', { class: 'key-form', novalidate: true },
      h('p', { class: 'banner error', 'data-testid': 'form-error', role: 'alert', hidden: true }),
      h('p', { class: 'intro', text: 'Rotation issues a new secret for the same key: its id, limits, spend and traces stay. The old secret keeps working for the grace period, so agents can switch over without downtime.' }),
      field('grace', 'Grace period for the old secret', textInput({ value: '1h', placeholder: '1h' }), 'For example 15m, 1h or 1d; 0s ends the old secret now.'));
    const go = h('button', { type: 'submit', class: 'btn primary', text: 'Rotate' });
    const cancel = h('button', { type: 'button', class: 'btn', text: 'Cancel' });
    cancel.addEventListener('click', () => m.close());
    form.append(h('footer', { class: 'dialog-foot' }, h('span', { class: 'spacer' }), cancel, go));
    m.body.append(form);
    form.elements.namedItem('grace').select();
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      clearErrors(form);
      const grace = form.elements.namedItem('grace').value.trim();
      busy(go, true, 'Rotating…');
      try {
        const key = await api('POST', `/admin/keys/${encodeURIComponent(k.id)}/rotate`, grace ? { grace } : {});
        m.dlg.classList.add('wide');
        showSecret(m, { ...k, ...key }, 'rotated');
        refreshKeysSoon();
      } catch (err) {
        busy(go, false, 'Rotate');
        if (err.status !== 401) showError(form, err);
      }
    });
  }

  function openRevokeDialog(k) {
    const m = modal(`Revoke ${k.name}?`, { testid: 'revoke-dialog' });
    const err = h('p', { class: 'banner error', 'data-testid': 'form-error', role: 'alert', hidden: true });
    const go = button('Revoke', { class: 'btn danger', 'data-testid': 'confirm-revoke' }, 'revoke');
    const cancel = h('button', { type: 'button', class: 'btn', 'data-testid': 'cancel-revoke', text: 'Cancel' });
    cancel.addEventListener('click', () => m.close());
    m.body.append(err,
      h('p', {}, 'Agents using ', h('code', { text: k.display || k.prefix }), ' are refused at once with ',
        h('code', { text: '401 token_revoked' }), '. This cannot be undone; its spend and traces are kept.'),
      h('footer', { class: 'dialog-foot' }, h('span', { class: 'spacer' }), cancel, go));
    cancel.focus();
    go.addEventListener('click', async () => {
      go.disabled = true;
      try {
        await api('POST', `/admin/keys/${encodeURIComponent(k.id)}/revoke`);
        m.close();
        toast(`Revoked ${k.name}.`);
        refreshKeysSoon();
      } catch (e) {
        go.disabled = false;
        if (e.status !== 401) { err.textContent = e.message; err.hidden = false; }
      }
    });
  }

  // ---------------------------------------------------------------- start

  document.addEventListener('click', (e) => {
    const a = e.target.closest('a[data-nav]');
    if (a && e.button === 0 && !e.metaKey && !e.ctrlKey && !e.shiftKey && !e.altKey) {
      e.preventDefault();
      const href = a.getAttribute('href');
      if (href !== location.pathname + location.search) navigate(href);
      return;
    }
    if (document.querySelector('dialog[open]') && !e.target.closest('dialog')) return;
    const c = e.target.closest('button[data-action="connect"]');
    if (c) { openConnectDialog(); return; }
    const k = e.target.closest('#page button[data-action][data-key-id]');
    if (k) onKeyAction(k);
  });
  window.addEventListener('popstate', () => { if (token()) route(); });

  async function boot() {
    const t = token();
    if (!t) { renderSignIn(); return; }
    try {
      state.info = (await loadInfo(t)) || {};
      seedColors();
    } catch (e) {
      if (e.status === 401) { signOut('The admin token was refused. Sign in again.'); return; }
      state.info = { public_url: null, models: [], aliases: [] };
    }
    renderShell();
    route();
  }

  // What the pages in the other files (fleet.js: Groups, Alerts) build with; they add their
  // pages here before boot, which waits for every deferred script.
  window.SpiderGate = Object.freeze({
    h, s, fill, patch, button, icon, bar, money, int, plural, timeEl, api, poller, setLive, toast,
    modal, field, textInput, numInput, clearErrors, showError, numberOrRaw, busy, errorBanner,
    modelBars, refreshKeysSoon, fetchGroups, state, POLL_MS,
    addPage(path, page) { PAGES[path] = page; },
  });
  document.addEventListener('DOMContentLoaded', boot);
})();
