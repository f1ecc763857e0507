#!lua flags=allow-oom
-- A job ends, in one atomic step that respects a cancel or delete that came first: then nothing of the
-- outcome is written. Allowed when Redis is out of memory, so that every accepted job can end. The worker
-- has written the outcome's blobs already; it removes them again when this step keeps nothing. The job leaves
-- arq's queue here rather than when arq's own end of the try comes, so the dispatch can fill its place now.
-- KEYS: 1 metadata, 2 running set, 3 counters, 4 pending inputs, 5 webhook deliveries due
-- ARGV: 1 job id, 2 finished (ms), 3 ttl (ms), 4 status, 5 outcome fields as a flat JSON list,
--       6 counter increments as a JSON list of [field, amount], 7 the changed channel, 8 a delivery's key
--       prefix, 9 S, 10 the try's fence (its attempt number, from start.lua)
-- Returns the job's status after the step: ARGV[4], or 'canceled', or 'gone' (deleted or expired), or 'stale'
-- when a newer try has started since (this one stalled past its lease): then nothing at all changes.
local attempts = redis.call('HGET', KEYS[1], 'attempts')
if attempts and attempts ~= ARGV[10] then return 'stale' end
local S = cjson.decode(ARGV[9])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', S.queue, ARGV[1])
local owner = redis.call('HGET', KEYS[1], 'owner')
leave_backlog(S, ARGV[1], owner or '')
dispatch(S, tonumber(ARGV[2]))
if not owner then return 'gone' end
local current = redis.call('HGET', KEYS[1], 'status')
if current then return current end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[2], unpack(cjson.decode(ARGV[5])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
for _, increment in ipairs(cjson.decode(ARGV[6])) do
  local name, amount = increment[1], increment[2]
  if name:sub(-4) == ':sum' then
    redis.call('HINCRBYFLOAT', KEYS[3], name, amount)
  else
    redis.call('HINCRBY', KEYS[3], name, amount)  -- counts stay integers, as cancel.lua counts them too
  end
end
queue_delivery({due = KEYS[5], prefix = ARGV[8]}, KEYS[1], ARGV[1], 'completed', ARGV[2])
redis.call('PUBLISH', ARGV[7], ARGV[1])
return ARGV[4]
