-- A job ends, in one atomic step that respects a cancel or delete that came first: then nothing of the
-- outcome is written.
-- KEYS: 1 metadata, 2 input, 3 mask, 4 running set, 5 counters
-- ARGV: 1 job id, 2 finished (ms), 3 ttl (ms), 4 status, 5 outcome fields as a flat JSON list,
--       6 the mask PNG or '', 7 counter increments as a JSON list of [field, amount], 8 the changed channel
-- Returns the job's status after the step: ARGV[4], or 'canceled', or 'gone' (deleted or expired)
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 'gone'
end
local current = redis.call('HGET', KEYS[1], 'status')
if current then return current end
redis.call('HSET', KEYS[1], 'status', ARGV[4], 'finished_at', ARGV[2], unpack(cjson.decode(ARGV[5])))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
-- The input stays as long as the job: for overlay.png once it succeeded, for a retry once it failed.
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if ARGV[4] == 'succeeded' then redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[3]) end
for _, increment in ipairs(cjson.decode(ARGV[7])) do
  local name, amount = increment[1], increment[2]
  if name:sub(-4) == ':sum' then
    redis.call('HINCRBYFLOAT', KEYS[5], name, amount)
  else
    redis.call('HINCRBY', KEYS[5], name, amount)  -- counts stay integers, as cancel.lua counts them too
  end
end
queue_delivery(KEYS[1], ARGV[1], 'completed', ARGV[2])
redis.call('PUBLISH', ARGV[8], ARGV[1])
return ARGV[4]
