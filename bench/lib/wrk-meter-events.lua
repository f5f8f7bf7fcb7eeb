-- wrk script: valid, unique meter-event requests, as the worker sends them
-- (form body with identifier and timestamp, Idempotency-Key, Stripe-Version).
-- Usage: wrk ... -s wrk-meter-events.lua URL -- RUN_TAG
local threads = 0

function setup(thread)
	threads = threads + 1
	thread:set("tid", threads)
end

function init(args)
	run = args[1] or "run"
	counter = 0
	headers = {
		["Authorization"] = "Bearer sk_test_benchMockKey0000",
		["Content-Type"] = "application/x-www-form-urlencoded",
		["Stripe-Version"] = "2026-09-30.endive",
	}
end

function request()
	counter = counter + 1
	local id = "wrk-" .. run .. "-" .. tid .. "-" .. counter
	-- many customers, so the one-call-per-customer rule seldom bites
	local body = "event_name=bench_api&identifier=" .. id ..
		"&payload[stripe_customer_id]=cus_w" .. tid .. "x" .. (counter % 10000) ..
		"&payload[value]=1&timestamp=" .. os.time()
	headers["Idempotency-Key"] = id
	return wrk.format("POST", "/v1/billing/meter_events", headers, body)
end
