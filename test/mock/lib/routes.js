// routes.js: every Stripe endpoint the mock serves, and its handler. A
// handler gets a ctx that has passed faults, routing, authentication,
// Stripe-Account and rate limiting (request-pipeline.js).
'use strict';

const { handleMeterEvents } = require('./v1-meter-events');
const { handleMeterEventSession } = require('./v2-meter-event-sessions');
const { handleMeterEventStream } = require('./v2-meter-event-stream');
const { handleListMeters, handleGetMeter } = require('./meters');
const { handleSummaries } = require('./event-summaries');
const { handleAdjustments } = require('./adjustments');
const { handleV2Events } = require('./error-reports');

// Endpoints with a fixed path, keyed by "METHOD path".
const ROUTES = {
  'POST /v1/billing/meter_events': handleMeterEvents,
  'POST /v2/billing/meter_event_session': handleMeterEventSession,
  'POST /v2/billing/meter_event_stream': handleMeterEventStream,
  'GET /v1/billing/meters': handleListMeters,
  'POST /v1/billing/meter_event_adjustments': handleAdjustments,
  'GET /v2/core/events': handleV2Events,
};

// The handler of a request, or null (404). An id in the path is
// percent-decoded here (malformed: an internal error, 500).
function findRoute(method, path) {
  const handler = ROUTES[method + ' ' + path];
  if (handler) return handler;
  let m;
  if (method === 'GET' && (m = /^\/v1\/billing\/meters\/([^/]+)\/event_summaries$/.exec(path))) {
    const id = decodeURIComponent(m[1]);
    return (ctx) => handleSummaries(ctx, id);
  }
  if (method === 'GET' && (m = /^\/v1\/billing\/meters\/([^/]+)$/.exec(path))) {
    const id = decodeURIComponent(m[1]);
    return (ctx) => handleGetMeter(ctx, id);
  }
  return null;
}

module.exports = { findRoute };
