// SpiderGate dashboard, fleets (SPEC §7): Gate → Groups and Gate → Alerts. Built with the
// helpers app.js exports as `window.SpiderGate` (loaded first; both are deferred, and app.js
// boots on DOMContentLoaded, after this file has added its pages). Same rules as app.js: no
// inline script or style, no innerHTML with data, every figure from the admin API.
'use strict';

(() => {
  const {
    h, fill, patch, button, bar, money, int, timeEl, api, poller, setLive, toast, modal, field,
    textInput, numInput, clearErrors, showError, numberOrRaw, busy, errorBanner, modelBars,
    refreshKeysSoon, fetchGroups, state, POLL_MS, addPage,
  } = window.SpiderGate;

  // ---------------------------------------------------------------- Gate → Groups

  function renderGroups(container, params, ctx) {
    const intro = h('p', { class: 'muted intro', text: 'A group has its own monthly budget and rpm over the sum of its keys. Every figure is the admin API’s (GET /admin/groups).' });
    const add = button('New group', { class: 'btn primary', 'data-action': 'new-group' }, 'plus');
    add.addEventListener('click', () => openGroupDialog(null));
    const grid = h('div', { class: 'cards', 'data-testid': 'group-cards' });
    const status = h('div', { class: 'page-status' });
    container.append(h('div', { class: 'toolbar' }, intro, h('div', { class: 'spacer' }), add), status, grid);
    const cards = new Map();
    const names = new Map(); // key id -> name, for the keys of each group

    function groupSpend(g) {
      const spend = Number(g.spend_usd) || 0;
      const budget = g.budget_usd;
      const frac = budget ? spend / budget : 0;
      const level = !budget ? 'none' : frac >= 1 ? 'over' : frac >= 0.8 ? 'warn' : 'ok';
      return h('div', { class: 'spend' },
        h('div', { class: 'spend-head' },
          h('span', { class: 'label', text: 'Spend this month' }),
          g.month ? h('span', { class: 'muted small', text: g.month }) : null),
        h('div', { class: 'spend-line' },
          h('span', { class: 'spend-amount', 'data-testid': 'group-spend', 'data-usd': String(spend), text: money(spend) }),
          budget
            ? h('span', { class: 'muted', 'data-testid': 'group-budget' }, 'of ', money(budget),
              h('span', { class: 'mode mode-' + g.budget_mode, 'data-testid': 'group-mode', text: g.budget_mode }))
            : h('span', { class: 'muted', 'data-testid': 'group-budget', text: 'no budget' })),
        bar(budget ? Math.max(frac, spend > 0 ? 0.012 : 0) : 0, 'spend-bar level-' + level,
          budget ? `${Math.round(frac * 100)}% of the group's monthly budget` : 'No budget'));
    }

    function groupKeys(g) {
      const ids = g.keys || [];
      const shown = ids.slice(0, 20);
      return h('div', { class: 'group-keys' },
        h('div', { class: 'label', text: `Keys (${int(ids.length)})` }),
        ids.length
          ? h('ul', { class: 'children-list' }, shown.map((id) => h('li', {},
            h('a', { href: '/dashboard/gate/keys?q=' + encodeURIComponent(id), 'data-nav': true, 'data-testid': 'group-key', 'data-key-id': id, text: names.get(id) || id }),
            names.has(id) ? h('code', { class: 'small muted', text: ' ' + id }) : null)),
          ids.length > shown.length ? h('li', { class: 'muted small', text: `and ${int(ids.length - shown.length)} more` }) : null)
          : h('p', { class: 'muted small', text: 'No keys yet: pick this group when you connect an agent or edit a key.' }));
    }

    function head(g) {
      return h('header', { class: 'card-head' },
        h('div', { class: 'card-title' }, h('h3', { class: 'key-name', text: g.name }),
          h('div', { class: 'key-ids muted small' }, `${g.budget_mode} budget · `,
            h('span', { 'data-testid': 'group-rpm', text: g.rpm ? `${int(g.rpm)}/min` : 'no rpm limit' }))));
    }

    function body(g) {
      return h('div', { class: 'card-body' }, groupSpend(g), modelBars({ usage: { by_model: g.by_model } }), groupKeys(g));
    }

    function card(g) {
      const edit = button('Edit', { class: 'btn', 'data-action': 'edit-group', 'data-group': g.name }, 'edit');
      const del = button('Delete', { class: 'btn danger-ghost', 'data-action': 'delete-group', 'data-group': g.name }, 'revoke');
      edit.addEventListener('click', () => { const cur = (state.groups || []).find((x) => x.name === g.name); openGroupDialog(cur || g); });
      del.addEventListener('click', () => openDeleteGroupDialog(g.name));
      return h('article', { class: 'card group-card', 'data-group': g.name },
        head(g), body(g), h('div', { class: 'card-actions' }, h('div', { class: 'key-actions' }, edit, del)));
    }

    async function learnNames(groups) {
      for (const g of groups) {
        if (!(g.keys || []).slice(0, 20).some((id) => !names.has(id))) continue;
        const q = new URLSearchParams({ group: g.name, all: 'true', limit: '100' });
        const data = await api('GET', '/admin/keys?' + q);
        for (const k of (data && data.data) || []) names.set(k.id, k.name);
      }
    }

    function draw() {
      const groups = state.groups;
      if (!groups) return;
      if (!groups.length) {
        fill(grid);
        cards.clear();
        fill(status, h('div', { class: 'empty-state', 'data-testid': 'empty-state' },
          h('h2', { text: 'No groups yet' }),
          h('p', { class: 'muted', text: 'Put the keys of one team or one fleet of agents in a group to give them a shared budget and rpm.' })));
        return;
      }
      fill(status);
      const seen = new Set();
      let prev = null;
      for (const g of groups) {
        seen.add(g.name);
        let el = cards.get(g.name);
        if (!el) { el = card(g); cards.set(g.name, el); } else {
          patch(el.querySelector('.card-head'), head(g));
          patch(el.querySelector('.card-body'), body(g));
        }
        const want = prev ? prev.nextSibling : grid.firstChild;
        if (want !== el) grid.insertBefore(el, want);
        prev = el;
      }
      for (const [name, el] of cards) if (!seen.has(name)) { el.remove(); cards.delete(name); }
    }

    ctx.refresh = async () => { await fetchGroups(); if (ctx.alive) draw(); };
    fill(status, h('p', { class: 'muted center', text: 'Loading groups…' }));
    return poller(async () => {
      try {
        const groups = await fetchGroups();
        await learnNames(groups);
        setLive(true);
      } catch (e) {
        if (ctx.alive && e.status !== 401) fill(status, errorBanner(e));
        throw e;
      }
      if (ctx.alive) draw();
    }, POLL_MS, ctx);
  }

  function openGroupDialog(g) {
    const m = modal(g ? `Edit group ${g.name}` : 'New group', { testid: 'group-dialog' });
    const v = (x) => (x === null || x === undefined ? '' : String(x));
    const mode = h('select', { class: 'select' },
      h('option', { value: 'hard', text: 'hard: refuse requests over budget' }),
      h('option', { value: 'soft', text: 'soft: allow and flag' }));
    mode.value = (g && g.budget_mode) || 'hard';
    const name = textInput({ placeholder: 'e.g. research-fleet', value: g ? g.name : '' });
    if (g) name.disabled = true;
    const form = h('form', { class: 'key-form', novalidate: true, autocomplete: 'off' },
      h('p', { class: 'banner error', 'data-testid': 'form-error', role: 'alert', hidden: true }),
      field('name', 'Name', name, g ? 'A group keeps its name.' : 'Letters, digits, - and _.'),
      h('div', { class: 'grid-2' },
        field('budget', 'Monthly budget (USD)', textInput({ inputmode: 'decimal', placeholder: 'no budget', value: v(g && g.budget_usd) })),
        field('budget_mode', 'When the budget is spent', mode)),
      field('rpm', 'Requests / minute', numInput({ value: v(g && g.rpm) }), 'Over every key of the group together.'));
    const save = h('button', { type: 'submit', class: 'btn primary', text: g ? 'Save' : 'Create' });
    const cancel = h('button', { type: 'button', class: 'btn', text: 'Cancel' });
    cancel.addEventListener('click', () => m.close());
    form.append(h('footer', { class: 'dialog-foot' }, h('span', { class: 'spacer' }), cancel, save));
    m.body.append(form);
    (g ? form.elements.namedItem('budget') : name).focus();
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      clearErrors(form);
      const val = (n) => form.elements.namedItem(n).value;
      const budget = numberOrRaw(val('budget'), true);
      const rpm = numberOrRaw(val('rpm'));
      const body = {};
      if (!g) {
        body.name = val('name').trim();
        body.budget_mode = val('budget_mode');
        if (budget !== undefined) body.budget_usd = budget;
        if (rpm !== undefined) body.rpm = rpm;
      } else {
        // Only what changed, so a concurrent change to another field survives.
        if ((budget ?? null) !== (g.budget_usd ?? null)) body.budget_usd = budget ?? null;
        if ((rpm ?? null) !== (g.rpm ?? null)) body.rpm = rpm ?? null;
        if (val('budget_mode') !== g.budget_mode) body.budget_mode = val('budget_mode');
        if (!Object.keys(body).length) { m.close(); toast('Nothing changed.'); return; }
      }
      busy(save, true, g ? 'Saving…' : 'Creating…');
      try {
        const out = g
          ? await api('PATCH', '/admin/groups/' + encodeURIComponent(g.name), body)
          : await api('POST', '/admin/groups', body);
        m.close();
        toast(g ? `Saved ${out.name}.` : `Created group ${out.name}.`);
        refreshKeysSoon();
      } catch (err) {
        busy(save, false, g ? 'Save' : 'Create');
        if (err.status !== 401) showError(form, err);
      }
    });
  }

  function openDeleteGroupDialog(name) {
    const m = modal(`Delete group ${name}?`, { testid: 'delete-group-dialog' });
    const err = h('p', { class: 'banner error', 'data-testid': 'form-error', role: 'alert', hidden: true });
    const go = button('Delete', { class: 'btn danger', 'data-testid': 'confirm-delete-group' }, 'revoke');
    const cancel = h('button', { type: 'button', class: 'btn', text: 'Cancel' });
    cancel.addEventListener('click', () => m.close());
    m.body.append(err, h('p', { text: 'Its budget and rpm stop applying. Its spend and its keys’ traces are kept.' }),
      h('footer', { class: 'dialog-foot' }, h('span', { class: 'spacer' }), cancel, go));
    cancel.focus();
    go.addEventListener('click', async () => {
      go.disabled = true;
      try {
        await api('DELETE', '/admin/groups/' + encodeURIComponent(name));
        m.close();
        toast(`Deleted group ${name}.`);
        refreshKeysSoon();
      } catch (e) {
        go.disabled = false;
        if (e.status !== 401) { err.textContent = e.message; err.hidden = false; }
      }
    });
  }

  // ---------------------------------------------------------------- Gate → Alerts

  function renderAlerts(container, params, ctx) {
    const intro = h('p', { class: 'muted intro', text: 'Webhook deliveries of budget thresholds and runaway-agent alerts, newest first (GET /admin/alerts).' });
    const tbody = h('tbody');
    const table = h('table', { class: 'table alerts-table', 'data-testid': 'alerts-table' },
      h('thead', {}, h('tr', {},
        ['Time', 'Id', 'Event', 'Subject', 'Threshold', 'State', 'Attempts', 'Last error']
          .map((t) => h('th', { scope: 'col', text: t, class: t === 'Attempts' ? 'num' : null })))),
      tbody);
    const wrap = h('div', { class: 'table-wrap' }, table);
    const status = h('div', { class: 'page-status' });
    container.append(intro, status, wrap);
    wrap.hidden = true;

    function subject(a) {
      // The name travels in the delivery's payload (the JSON the webhook got).
      let payload = a.payload;
      if (typeof payload === 'string') { try { payload = JSON.parse(payload); } catch (_) { payload = null; } }
      a = Object.assign({}, a, { name: a.name || (payload && payload.name) || null });
      if (a.group) {
        return h('span', {}, h('span', { class: 'tag small', text: 'group' }), ' ',
          h('a', { href: '/dashboard/gate/groups', 'data-nav': true, text: a.name || a.group }));
      }
      if (a.key_id) {
        return h('span', {}, h('a', { href: '/dashboard/gate/keys?q=' + encodeURIComponent(a.key_id), 'data-nav': true, text: a.name || a.key_id }),
          ' ', h('code', { class: 'small muted', text: a.key_id }));
      }
      return h('span', { class: 'muted', text: a.name || '—' });
    }

    function threshold(a) {
      if (a.threshold === null || a.threshold === undefined) return h('span', { class: 'muted', text: '—' });
      const t = Number(a.threshold);
      return h('span', { title: a.month ? `month ${a.month}` : null, text: Number.isNaN(t) ? String(a.threshold) : `${Math.round(t * 100)}%` });
    }

    function row(a) {
      const st = String(a.state || '');
      return h('tr', { 'data-testid': 'alert-row', 'data-alert-id': a.id ?? null, 'data-state': st, 'data-subject': a.group || a.key_id || null },
        h('td', { class: 'nowrap' }, timeEl(a.created_at, 'trace')),
        h('td', {}, h('code', { class: 'small', text: String(a.id ?? '—') })),
        h('td', {}, h('code', { class: 'small', text: a.event || '—' })),
        h('td', { class: 'small' }, subject(a)),
        h('td', {}, threshold(a)),
        h('td', {}, h('span', { class: 'badge alert-' + st, text: st || '—' })),
        h('td', { class: 'num', text: int(a.attempts ?? 0) }),
        h('td', { class: 'small' }, a.last_error ? h('span', { class: 'danger-text', text: a.last_error }) : h('span', { class: 'muted', text: '—' })));
    }

    async function load() {
      let data;
      try {
        data = await api('GET', '/admin/alerts?limit=100');
      } catch (e) {
        if (e.status !== 404) throw e;
        // A gateway without GET /admin/alerts (or without alerts in its config).
        if (!ctx.alive) return;
        wrap.hidden = true;
        fill(status, h('div', { class: 'empty-state', 'data-testid': 'alerts-unconfigured' },
          h('h2', { text: 'Alerts are not configured' }),
          h('p', { class: 'muted' }, 'This gateway does not list alert deliveries. Add webhooks under ',
            h('code', { text: 'alerts:' }), ' in the config to be told when a key or group crosses a budget threshold.')));
        return;
      }
      if (!ctx.alive) return;
      setLive(true);
      // Newest first, whatever order the answer had (a stable sort keeps the API's order for
      // equal or unreadable times).
      const at = (a) => { const t = new Date(a.created_at).getTime(); return Number.isNaN(t) ? 0 : t; };
      const list = ((data && data.data) || []).slice().sort((a, b) => at(b) - at(a));
      if (!list.length) {
        wrap.hidden = true;
        fill(status, h('div', { class: 'empty-state', 'data-testid': 'alerts-empty' },
          h('h2', { text: 'No alerts yet' }),
          h('p', { class: 'muted', text: 'A delivery appears here when a key or group first crosses a budget threshold this month.' })));
        return;
      }
      fill(status);
      wrap.hidden = false;
      const existing = [...tbody.children];
      fill(tbody, ...list.map((a) => { const r = row(a); return existing.find((o) => o.isEqualNode(r)) || r; }));
    }

    return poller(async () => {
      try { await load(); } catch (e) { if (ctx.alive && e.status !== 401) fill(status, errorBanner(e)); throw e; }
    }, POLL_MS * 2, ctx);
  }

  addPage('/dashboard/gate/groups', { id: 'groups', group: 'Gate', title: 'Groups', render: renderGroups });
  addPage('/dashboard/gate/alerts', { id: 'alerts', group: 'Gate', title: 'Alerts', render: renderAlerts });
})();
