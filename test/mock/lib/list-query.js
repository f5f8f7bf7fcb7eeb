// list-query.js: the query string of the GET list endpoints: parameters
// (repeated ones refused, types/[] arrays gathered), v1's allowed names,
// `limit` and cursor pagination (starting_after, ending_before) into
// Stripe's {object: "list", data, has_more, url}.
'use strict';

const { invalid } = require('./stripe-errors');
const { reply } = require('./delivery');

// {params, dup}: the query's parameters and the names given twice.
function queryParams(ctx) {
  const u = ctx.req.url;
  const q = u.indexOf('?');
  const sp = new URLSearchParams(q < 0 ? '' : u.slice(q + 1));
  const out = Object.create(null);
  const dup = [];
  for (const [k, v] of sp) {
    if (out[k] !== undefined && !k.endsWith('[]') && k !== 'types') dup.push(k);
    if (k === 'types' || k.startsWith('types[') || k.endsWith('[]')) {
      const key = k.startsWith('types') ? 'types' : k.slice(0, -2);
      (out[key] = out[key] || []).push(v);
    } else out[k] = v;
  }
  return { params: out, dup };
}

// The parameters, or null after a 400 (a repeat, an unknown name).
function v1Query(ctx, allowed) {
  const { params, dup } = queryParams(ctx);
  if (dup.length) {
    reply(ctx, 400, invalid('Received parameter ' + dup[0] + ' more than once.', dup[0], 'parameter_duplicate'));
    return null;
  }
  for (const k of Object.keys(params)) {
    if (!allowed.has(k)) {
      reply(ctx, 400, invalid('Received unknown parameter: ' + k, k, 'parameter_unknown'));
      return null;
    }
  }
  return params;
}

// limit: 1..100, default 10; returns the number or null after replying.
function listLimit(ctx, params) {
  if (params.limit === undefined) return 10;
  if (!/^[0-9]+$/.test(params.limit) || +params.limit < 1 || +params.limit > 100) {
    reply(ctx, 400, invalid('Invalid integer: ' + params.limit + '; must be between 1 and 100', 'limit', 'parameter_invalid_integer'));
    return null;
  }
  return +params.limit;
}

// Cursor pagination over `all` (already ordered); replies on a bad cursor.
function page(ctx, all, params, limit, url, what) {
  let start = 0;
  let end = all.length;
  if (params.starting_after !== undefined) {
    const i = all.findIndex((o) => o.id === params.starting_after);
    if (i < 0) {
      reply(ctx, 404, invalid('No such ' + what + ": '" + params.starting_after + "'", 'starting_after', 'resource_missing'));
      return;
    }
    start = i + 1;
  } else if (params.ending_before !== undefined) {
    const i = all.findIndex((o) => o.id === params.ending_before);
    if (i < 0) {
      reply(ctx, 404, invalid('No such ' + what + ": '" + params.ending_before + "'", 'ending_before', 'resource_missing'));
      return;
    }
    end = i;
    start = Math.max(0, end - limit);
  }
  const data = all.slice(start, Math.min(end, start + limit));
  reply(ctx, 200, { object: 'list', data, has_more: start + data.length < end, url });
}

module.exports = { queryParams, v1Query, listLimit, page };
