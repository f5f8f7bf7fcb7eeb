// media-types.js: the Content-Type checks of request bodies: API v1 takes
// application/x-www-form-urlencoded, API v2 application/json (either may
// carry parameters such as a charset).
'use strict';

function isMediaForm(ct) {
  if (!ct) return false;
  const semi = ct.indexOf(';');
  const media = (semi < 0 ? ct : ct.slice(0, semi)).trim().toLowerCase();
  return media === 'application/x-www-form-urlencoded';
}

function isMediaJson(ct) {
  if (ct === undefined) return false;
  return /^application\/json\s*(;.*)?$/i.test(ct.trim());
}

module.exports = { isMediaForm, isMediaJson };
