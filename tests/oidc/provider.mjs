// A real OpenID Connect provider for the test suite (npm `oidc-provider`, an OpenID-certified
// implementation), shaped like EBRAINS IAM (Keycloak realm `hbp`) where it matters to the hub:
//
// - one (or more) confidential client(s): client_secret_post, authorization_code + refresh_token,
//   PKCE required by default (oauthenticator 17.4 sends code_challenge S256 unless enable_pkce=False);
// - userinfo claims: sub, preferred_username, name, given_name, family_name, email, email_verified,
//   and EBRAINS' membership claim `roles: {group: [...], team: [...]}` (team entries look like
//   `collab-<collab>-<viewer|editor|administrator>`), plus an optional flat `groups` list;
// - users (username, password, claims) from a JSON file given on start, more added at run time;
// - short, configurable access-token lifetime; refresh tokens always issued (like Keycloak, no
//   `offline_access` needed) and rotated on use;
// - a minimal login form (fields `username`, `password`) and consent form (button "Allow"),
//   plain HTML that both `requests` and a headless browser can submit;
// - test-only admin endpoints under /_test/ (add users, (re)register clients, revoke a user's tokens),
//   and GET /_test/callback, a redirect URI that echoes its query as JSON (for client-side tests).
//
// Usage: node provider.mjs [--port 0] [--host 127.0.0.1] [--client-id ID] [--client-secret S]
//          [--redirect-uri URI]... [--users FILE] [--access-token-ttl SECONDS]
//          [--refresh-token-ttl SECONDS] [--admin-token TOKEN] [--pkce-required true|false]
//          [--consent form|auto]
// Every option can also come from the environment: OIDC_PORT, OIDC_HOST, OIDC_CLIENT_ID,
// OIDC_CLIENT_SECRET, OIDC_REDIRECT_URIS (comma-separated), OIDC_USERS_FILE, OIDC_ACCESS_TOKEN_TTL,
// OIDC_REFRESH_TOKEN_TTL, OIDC_ADMIN_TOKEN, OIDC_PKCE_REQUIRED, OIDC_CONSENT (argv wins).
// Port 0 picks a free port. When listening, one JSON line is printed on stdout:
//   {"event":"ready","issuer":"http://127.0.0.1:PORT","port":PORT,...}
// NOT for production: everything is kept in memory and the admin API is unauthenticated unless
// --admin-token is given.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

// ---------------------------------------------------------------------------------------------
// options

const { values: argv } = parseArgs({
  options: {
    port: { type: 'string' },
    host: { type: 'string' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'redirect-uri': { type: 'string', multiple: true },
    users: { type: 'string' },
    'access-token-ttl': { type: 'string' },
    'refresh-token-ttl': { type: 'string' },
    'admin-token': { type: 'string' },
    'pkce-required': { type: 'string' },
    consent: { type: 'string' },
  },
  strict: true,
});

const env = process.env;
const pick = (name, envName, fallback) => argv[name] ?? env[envName] ?? fallback;
const toBool = (value) => !['0', 'false', 'no', 'off', ''].includes(String(value).toLowerCase());
const toSeconds = (value, what) => {
  const n = Number(value);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${what} must be a positive integer, got ${value}`);
  return n;
};

const HOST = pick('host', 'OIDC_HOST', '127.0.0.1');
const PORT = Number(pick('port', 'OIDC_PORT', '0'));
const CLIENT_ID = pick('client-id', 'OIDC_CLIENT_ID', 'spinnaker-jupyter');
const CLIENT_SECRET = pick('client-secret', 'OIDC_CLIENT_SECRET', crypto.randomBytes(16).toString('hex'));
const REDIRECT_URIS = argv['redirect-uri']
  ?? (env.OIDC_REDIRECT_URIS ? env.OIDC_REDIRECT_URIS.split(',').map((s) => s.trim()).filter(Boolean) : []);
const USERS_FILE = pick('users', 'OIDC_USERS_FILE', undefined);
const ACCESS_TOKEN_TTL = toSeconds(pick('access-token-ttl', 'OIDC_ACCESS_TOKEN_TTL', '60'), 'access token ttl');
const REFRESH_TOKEN_TTL = toSeconds(pick('refresh-token-ttl', 'OIDC_REFRESH_TOKEN_TTL', '3600'), 'refresh token ttl');
const ADMIN_TOKEN = pick('admin-token', 'OIDC_ADMIN_TOKEN', '');
const PKCE_REQUIRED = toBool(pick('pkce-required', 'OIDC_PKCE_REQUIRED', 'true'));
const CONSENT = pick('consent', 'OIDC_CONSENT', 'form');
if (!['form', 'auto'].includes(CONSENT)) throw new Error(`--consent must be form or auto, got ${CONSENT}`);

// ---------------------------------------------------------------------------------------------
// an in-memory adapter that can also find a user's tokens (for the revocation endpoint)

const store = new Map(); // `${model}:${id}` -> { model, id, payload, expiresAt (ms) | undefined }

function live(entry) {
  if (!entry) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(`${entry.model}:${entry.id}`);
    return undefined;
  }
  return entry;
}

class TestAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), {
      model: this.model,
      id,
      payload,
      expiresAt: typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : undefined,
    });
  }

  async find(id) {
    return live(store.get(this.key(id)))?.payload;
  }

  async findByUid(uid) {
    for (const entry of store.values()) {
      if (entry.model === this.model && entry.payload.uid === uid && live(entry)) return entry.payload;
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    for (const entry of store.values()) {
      if (entry.model === this.model && entry.payload.userCode === userCode && live(entry)) return entry.payload;
    }
    return undefined;
  }

  async consume(id) {
    const entry = live(store.get(this.key(id)));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

function revokeForAccount(accountId, models) {
  const counts = Object.fromEntries(models.map((m) => [m, 0]));
  for (const [key, entry] of store) {
    if (models.includes(entry.model) && entry.payload.accountId === accountId) {
      store.delete(key);
      counts[entry.model] += 1;
    }
  }
  return counts;
}

// ---------------------------------------------------------------------------------------------
// users

const users = new Map(); // username -> { username, password, sub, claims }

function stableSub(username) {
  // EBRAINS `sub` values are UUIDs; derive a stable UUID-shaped one from the username.
  const h = crypto.createHash('sha256').update(`sub:${username}`).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-a${h.slice(17, 20)}-${h.slice(20, 32)}`;
}

function addUser(spec) {
  if (!spec || typeof spec !== 'object') throw new Error('a user must be an object');
  const { username, password } = spec;
  if (typeof username !== 'string' || !username.length) throw new Error('user.username must be a non-empty string');
  if (typeof password !== 'string' || !password.length) throw new Error(`user ${username}: password must be a non-empty string`);
  const claims = { ...(spec.claims ?? {}) };
  const user = {
    username,
    password,
    sub: spec.sub ?? claims.sub ?? stableSub(username),
    claims: {
      preferred_username: username,
      name: username,
      email: `${username}@example.org`,
      email_verified: true,
      roles: { group: [], team: [] },
      ...claims,
    },
  };
  delete user.claims.sub;
  users.set(username, user);
  return user;
}

function userBySub(sub) {
  for (const user of users.values()) if (user.sub === sub) return user;
  return undefined;
}

function loadUsersFile(path) {
  const data = JSON.parse(fs.readFileSync(path, 'utf8'));
  const list = Array.isArray(data) ? data : data.users;
  if (!Array.isArray(list)) throw new Error(`${path}: expected a list of users or {"users": [...]}`);
  list.forEach(addUser);
}

if (USERS_FILE) loadUsersFile(USERS_FILE);

// ---------------------------------------------------------------------------------------------
// clients live in the adapter (so /_test/clients can add or re-register them at run time)

function clientMetadata({ client_id: id, client_secret: secret, redirect_uris: uris, ...extra }) {
  if (typeof id !== 'string' || !id) throw new Error('client_id is required');
  if (typeof secret !== 'string' || !secret) throw new Error('client_secret is required');
  if (!Array.isArray(uris) || !uris.length) throw new Error('redirect_uris must be a non-empty list');
  return {
    client_id: id,
    client_secret: secret,
    redirect_uris: uris,
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_post',
    ...extra,
  };
}

async function registerClient(spec) {
  const metadata = clientMetadata(spec);
  await new TestAdapter('Client').upsert(metadata.client_id, metadata);
  return metadata;
}

// ---------------------------------------------------------------------------------------------
// HTML

const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
}[c]));

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><main><h1>${escapeHtml(title)}</h1>
${body}
</main></body></html>`;
}

function loginPage(uid, { error, username } = {}) {
  return page('Sign in to the test identity provider', `
${error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : ''}
<form id="kc-form-login" method="post" action="/interaction/${escapeHtml(uid)}/login">
  <label>Username <input id="username" type="text" name="username" autocomplete="username" value="${escapeHtml(username ?? '')}" required autofocus></label>
  <label>Password <input id="password" type="password" name="password" autocomplete="current-password" required></label>
  <button id="kc-login" type="submit" name="login" value="Sign in">Sign in</button>
</form>
<p><a href="/interaction/${escapeHtml(uid)}/abort">Cancel</a></p>`);
}

function consentPage(uid, clientId, details) {
  const scopes = (details.missingOIDCScope ?? []).filter((s) => s !== 'openid');
  return page('Grant access', `
<p>The application <strong>${escapeHtml(clientId)}</strong> asks for access to your account${scopes.length ? ':' : '.'}</p>
${scopes.length ? `<ul>${scopes.map((s) => `<li>${escapeHtml(s)}</li>`).join('')}</ul>` : ''}
<form id="kc-form-consent" method="post" action="/interaction/${escapeHtml(uid)}/confirm">
  <button id="kc-login" type="submit" name="accept" value="yes">Allow</button>
</form>
<p><a href="/interaction/${escapeHtml(uid)}/abort">Deny</a></p>`);
}

// ---------------------------------------------------------------------------------------------
// small HTTP helpers

function send(res, status, body, type = 'text/html; charset=utf-8') {
  res.statusCode = status;
  res.setHeader('Content-Type', type);
  res.setHeader('Cache-Control', 'no-store');
  res.end(body);
}

const sendJson = (res, status, obj) => send(res, status, JSON.stringify(obj), 'application/json');

async function readBody(req, limit = 1 << 20) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > limit) throw Object.assign(new Error('request body too large'), { status: 413 });
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readForm(req) {
  return Object.fromEntries(new URLSearchParams(await readBody(req)));
}

async function readJson(req) {
  const text = await readBody(req);
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    throw Object.assign(new Error('invalid JSON body'), { status: 400 });
  }
}

// ---------------------------------------------------------------------------------------------
// interactions (login, consent)

let provider; // set once the server listens (the issuer needs the port)

async function grantConsent(details, session, params, grantId) {
  const grant = grantId
    ? await provider.Grant.find(grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (details.missingOIDCScope) grant.addOIDCScope(details.missingOIDCScope.join(' '));
  if (details.missingOIDCClaims) grant.addOIDCClaims(details.missingOIDCClaims);
  if (details.missingResourceScopes) {
    for (const [indicator, scope] of Object.entries(details.missingResourceScopes)) {
      grant.addResourceScope(indicator, scope.join(' '));
    }
  }
  return grant.save();
}

async function handleInteraction(req, res, uid, action) {
  const interaction = await provider.interactionDetails(req, res);
  if (interaction.uid !== uid) {
    send(res, 400, page('Error', '<p>This sign-in attempt does not match your session.</p>'));
    return;
  }
  const { prompt: { name, details }, params, session, grantId } = interaction;

  if (action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied', error_description: 'End-User aborted interaction',
    }, { mergeWithLastSubmission: false });
    return;
  }

  if (name === 'login') {
    if (action === '' && req.method === 'GET') {
      send(res, 200, loginPage(uid, { username: params.login_hint }));
      return;
    }
    if (action === 'login' && req.method === 'POST') {
      const form = await readForm(req);
      const user = users.get(form.username ?? '');
      const ok = user && typeof form.password === 'string'
        && crypto.timingSafeEqual(
          crypto.createHash('sha256').update(form.password).digest(),
          crypto.createHash('sha256').update(user.password).digest(),
        );
      if (!ok) {
        send(res, 200, loginPage(uid, { error: 'Invalid username or password.', username: form.username }));
        return;
      }
      await provider.interactionFinished(req, res, { login: { accountId: user.sub } }, {
        mergeWithLastSubmission: false,
      });
      return;
    }
  }

  if (name === 'consent') {
    if (action === '' && req.method === 'GET' && CONSENT === 'form') {
      send(res, 200, consentPage(uid, params.client_id, details));
      return;
    }
    if ((action === 'confirm' && req.method === 'POST') || (CONSENT === 'auto' && req.method === 'GET')) {
      const consentGrantId = await grantConsent(details, session, params, grantId);
      await provider.interactionFinished(req, res, { consent: { grantId: consentGrantId } }, {
        mergeWithLastSubmission: true,
      });
      return;
    }
  }

  send(res, 400, page('Error', `<p>Unexpected step ${escapeHtml(action || 'show')} for prompt ${escapeHtml(name)}.</p>`));
}

// ---------------------------------------------------------------------------------------------
// test-only admin API

async function handleAdmin(req, res, path) {
  if (path === '/_test/callback' && req.method === 'GET') {
    // a redirect_uri target for tests that play the client themselves: echoes the query
    const url = new URL(req.url, 'http://placeholder');
    sendJson(res, 200, Object.fromEntries(url.searchParams));
    return;
  }
  if (ADMIN_TOKEN) {
    const given = req.headers.authorization ?? '';
    if (given !== `Bearer ${ADMIN_TOKEN}`) {
      sendJson(res, 401, { error: 'admin token required' });
      return;
    }
  }
  if (path === '/_test/health' && req.method === 'GET') {
    sendJson(res, 200, { ok: true, users: users.size });
    return;
  }
  if (path === '/_test/users' && req.method === 'GET') {
    sendJson(res, 200, { users: [...users.values()].map(({ username, sub, claims }) => ({ username, sub, claims })) });
    return;
  }
  if (path === '/_test/users' && req.method === 'POST') {
    const body = await readJson(req);
    const list = Array.isArray(body) ? body : (Array.isArray(body.users) ? body.users : [body]);
    const added = list.map(addUser).map(({ username, sub, claims }) => ({ username, sub, claims }));
    sendJson(res, 200, { users: added });
    return;
  }
  if (path === '/_test/clients' && req.method === 'POST') {
    const metadata = await registerClient(await readJson(req));
    sendJson(res, 200, { client_id: metadata.client_id, redirect_uris: metadata.redirect_uris });
    return;
  }
  if (path === '/_test/revoke' && req.method === 'POST') {
    // Revoke a user's refresh tokens (unless refresh_tokens: false), and optionally their access
    // tokens and provider sessions too (so the next login must show the login form again).
    const body = await readJson(req);
    const user = users.get(body.username ?? '');
    if (!user) {
      sendJson(res, 404, { error: `no such user ${body.username}` });
      return;
    }
    const models = [];
    if (body.refresh_tokens !== false) models.push('RefreshToken');
    if (body.access_tokens) models.push('AccessToken');
    if (body.sessions) models.push('Session');
    const counts = revokeForAccount(user.sub, models);
    sendJson(res, 200, {
      username: user.username,
      refresh_tokens: counts.RefreshToken ?? 0,
      access_tokens: counts.AccessToken ?? 0,
      sessions: counts.Session ?? 0,
    });
    return;
  }
  sendJson(res, 404, { error: 'not found' });
}

// ---------------------------------------------------------------------------------------------
// provider configuration

function buildProvider(issuer) {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomUUID(), use: 'sig', alg: 'RS256' };

  const configuration = {
    adapter: TestAdapter,
    jwks: { keys: [jwk] },
    cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
    async findAccount(ctx, sub) {
      const user = userBySub(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        async claims() {
          return { sub, ...structuredClone(user.claims) };
        },
      };
    },
    // scopes -> claims. EBRAINS IAM puts group and team (collab) membership in one `roles` object
    // (requested with the `group` / `team` / `roles` scopes); `groups` is a flat list for
    // generic-OIDC tests.
    scopes: ['openid', 'offline_access', 'profile', 'email', 'roles', 'team', 'group', 'groups'],
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username', 'given_name', 'family_name'],
      email: ['email', 'email_verified'],
      roles: ['roles'],
      team: ['roles'],
      group: ['roles'],
      groups: ['groups'],
    },
    features: {
      devInteractions: { enabled: false },
      userinfo: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      rpInitiatedLogout: { enabled: true },
    },
    interactions: {
      url(ctx, interaction) {
        return `/interaction/${interaction.uid}`;
      },
    },
    pkce: {
      required: () => PKCE_REQUIRED,
    },
    // Keycloak issues a refresh token with every code exchange, without `offline_access`.
    async issueRefreshToken(ctx, client) {
      return client.grantTypeAllowed('refresh_token');
    },
    // ... and rotates it on every use (oauthenticator keeps the new one in auth_state).
    rotateRefreshToken: true,
    ttl: {
      AccessToken: ACCESS_TOKEN_TTL,
      AuthorizationCode: 60,
      IdToken: ACCESS_TOKEN_TTL,
      RefreshToken: REFRESH_TOKEN_TTL,
      Interaction: 600,
      Session: REFRESH_TOKEN_TTL,
      Grant: REFRESH_TOKEN_TTL,
    },
    responseTypes: ['code'],
    clientDefaults: {
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_post',
    },
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', `<pre>${escapeHtml(JSON.stringify(out, null, 2))}</pre>`);
    },
  };
  const p = new Provider(issuer, configuration);
  p.on('server_error', (ctx, err) => console.error('oidc-provider server_error', err));
  return p;
}

// ---------------------------------------------------------------------------------------------
// server

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, 'http://placeholder');
    const path = url.pathname;
    if (path.startsWith('/_test/')) {
      await handleAdmin(req, res, path);
      return;
    }
    const m = path.match(/^\/interaction\/([A-Za-z0-9_-]+)(?:\/(login|confirm|abort))?\/?$/);
    if (m) {
      await handleInteraction(req, res, m[1], m[2] ?? '');
      return;
    }
    provider.callback()(req, res);
  } catch (err) {
    if (!res.headersSent) {
      const status = err.status ?? err.statusCode ?? 500;
      send(res, status, page('Error', `<p>${escapeHtml(err.error_description ?? err.message)}</p>`));
    } else {
      res.destroy(err);
    }
  }
});

server.listen(PORT, HOST, async () => {
  const { port } = server.address();
  const issuer = `http://${HOST}:${port}`;
  provider = buildProvider(issuer);
  if (REDIRECT_URIS.length) {
    await registerClient({ client_id: CLIENT_ID, client_secret: CLIENT_SECRET, redirect_uris: REDIRECT_URIS });
  }
  process.stdout.write(`${JSON.stringify({
    event: 'ready',
    issuer,
    port,
    client_id: REDIRECT_URIS.length ? CLIENT_ID : null,
    access_token_ttl: ACCESS_TOKEN_TTL,
    refresh_token_ttl: REFRESH_TOKEN_TTL,
    users: [...users.keys()],
  })}\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  });
}
