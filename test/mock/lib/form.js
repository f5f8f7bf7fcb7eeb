// form.js: API v1 request bodies: application/x-www-form-urlencoded with
// Stripe's bracket keys (payload[k]=v, expand[]=x, expand[0]=x), decoded to a
// tree of parameter hashes, arrays and strings. Refuses what Stripe refuses
// (a key given twice, malformed percent-encoding, one name both a string and
// a hash) with Stripe's 400 bodies. Plain keys are parsed without regexes:
// this is on the hot path of bench/'s drain.
'use strict';

const { invalid } = require('./stripe-errors');

function formDecode(s) {
  if (s.indexOf('%') < 0 && s.indexOf('+') < 0) return s;
  return decodeURIComponent(s.replace(/\+/g, ' '));
}

// Parameter hashes: objects without Object.prototype in their chain (so that
// names like "constructor" or "__proto__" are plain keys), made by a
// constructor rather than Object.create(null) so V8 keeps them in fast mode.
function Params() {}
Params.prototype = Object.create(null);

const PARAM_NAME_RE = /^([^[\]]+)((?:\[[^[\]]*\])*)$/;
const NO_SUBS = [];

function duplicateParam(k) {
  return { error: invalid('Received parameter ' + k + ' more than once. Each parameter may be given only once.', k, 'parameter_duplicate') };
}

// The name of a parameter down to its first n subscripts, as in errors.
function paramPath(name, subs, n) {
  let path = name;
  for (let i = 0; i < n; i++) path += '[' + subs[i] + ']';
  return path;
}

// Returns { params } (a tree of objects / arrays / strings, with the order of
// first appearance kept in params) or { error: {status, body} }.
function parseForm(body) {
  const params = new Params();
  if (body.length === 0) return { params };
  let seen = null;
  let start = 0;
  const blen = body.length;
  while (start <= blen) {
    let amp = body.indexOf('&', start);
    if (amp < 0) amp = blen;
    const part = body.slice(start, amp);
    start = amp + 1;
    if (part === '') continue;
    const eq = part.indexOf('=');
    let k, v;
    try {
      k = formDecode(eq < 0 ? part : part.slice(0, eq));
      v = formDecode(eq < 0 ? '' : part.slice(eq + 1));
    } catch (e) {
      return { error: invalid('Invalid request: the request body could not be decoded as application/x-www-form-urlencoded (malformed percent-encoding).') };
    }
    let name, subs;
    if (k.length > 0 && k.indexOf('[') < 0 && k.indexOf(']') < 0) {
      name = k;
      subs = NO_SUBS;
    } else {
      const m = PARAM_NAME_RE.exec(k);
      if (!m) {
        return { error: invalid('Invalid parameter name: ' + k + '.', k) };
      }
      name = m[1];
      subs = m[2] ? m[2].slice(1, -1).split('][') : NO_SUBS;
    }
    // A key given twice is refused. For a key without "[]" its path in the
    // tree is the key itself, and only that key can have put a string there,
    // so the walk below finds the repeat; a key with an inner "[]" starts a
    // new array element each time and needs remembering.
    let innerArray = false;
    for (let i = 0; i < subs.length - 1; i++) if (subs[i] === '') innerArray = true;
    if (innerArray && subs[subs.length - 1] !== '') {
      if (seen === null) seen = new Set();
      if (seen.has(k)) return duplicateParam(k);
      seen.add(k);
    }
    // Walk / build the tree.
    let holder = params, slot = name;
    for (let i = 0; i <= subs.length; i++) {
      const last = i === subs.length;
      const cur = holder[slot];
      if (last) {
        if (Array.isArray(holder)) holder.push(v);
        else if (typeof cur === 'string' && !innerArray) return duplicateParam(k);
        else if (cur !== undefined) {
          const path = paramPath(name, subs, i);
          return { error: invalid('Invalid value for ' + path + ': cannot be given both as a string and as a hash.', path) };
        } else holder[slot] = v;
        break;
      }
      const sub = subs[i];
      const wantArray = sub === '';
      let next = Array.isArray(holder) ? undefined : cur;
      if (next === undefined) {
        next = wantArray ? [] : new Params();
        if (Array.isArray(holder)) holder.push(next); else holder[slot] = next;
      } else if (typeof next === 'string' || Array.isArray(next) !== wantArray) {
        const path = paramPath(name, subs, i);
        return { error: invalid('Invalid value for ' + path + ': conflicting types for this parameter.', path) };
      }
      holder = next;
      slot = wantArray ? null : sub;
    }
  }
  return { params };
}

// Convert {"0": a, "1": b} (expand[0]=a) to [a, b].
function asArray(v) {
  if (Array.isArray(v)) return v;
  if (v && typeof v === 'object') {
    const keys = Object.keys(v);
    if (keys.every((k) => /^[0-9]+$/.test(k))) {
      return keys.sort((a, b) => a - b).map((k) => v[k]);
    }
  }
  return null;
}

module.exports = { parseForm, asArray };
