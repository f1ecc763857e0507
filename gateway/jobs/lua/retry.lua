#!lua
-- A failed, canceled or expired job goes back into its owner's queue under its own id; its attempts are kept.
-- It counts against the bounds as a new job does; no flags: refused whole when Redis is out of memory.
-- KEYS: 1 metadata, 2 arq's queue, 3 arq's job record, 4 arq's in-progress key, 5 arq's retry counter
-- ARGV: 1 job id, 2 now (ms), 3 arq's job record, 4 max queued, 5 max pending bytes, 6 the share of maxmemory
--       to stop at, 7 the owner's settings as JSON (as submit.lua takes them), 8 its place in the owner's queue,
--       9 S
-- Returns {'missing'} | {'refused', status} | {'no_input'} | {'full', which bound, ms to come back} |
--         {'queued'}
local S = cjson.decode(ARGV[9])
local now = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local status = redis.call('HGET', KEYS[1], 'status')
local owner = redis.call('HGET', KEYS[1], 'owner')
if not status and redis.call('EXISTS', KEYS[4]) == 0 and not redis.call('ZSCORE', KEYS[2], ARGV[1])
    and not redis.call('ZSCORE', S.waiting .. owner, ARGV[1]) then
  status = 'failed'  -- arq dropped it without an outcome: it reads as failed, and may be tried again
end
if status ~= 'failed' and status ~= 'canceled' and status ~= 'expired' then
  return {'refused', status or 'active'}
end
-- A job canceled while it ran keeps arq's records until that try ends; queued again now, arq's end of the
-- old try would take the new one out of the queue.
if redis.call('EXISTS', KEYS[4]) == 1 then return {'refused', 'ending'} end
if redis.call('HEXISTS', KEYS[1], 'input_gone') == 1 then return {'no_input'} end
local bytes = redis.call('HGET', KEYS[1], 'input_bytes') or '0'
local refused = refusal(S.backlog, S.stats, ARGV[4], bytes, ARGV[5], ARGV[6])
if refused then return {'full', refused, 5000} end
local admission = key_admission(S, owner, cjson.decode(ARGV[7]), now)
if admission.refused then return {'full', admission.refused, admission.retry_ms} end
redis.call('HDEL', KEYS[1], 'status', 'finished_at', 'started_at', 'result', 'error', 'timings_ms', 'deliveries',
  'mask', 'overlay')
redis.call('PEXPIRE', KEYS[1], S.ttl)
redis.call('DEL', KEYS[5])
redis.call('SET', KEYS[3], ARGV[3], 'PX', S.ttl)
add_pending(S.pending, S.stats, ARGV[1], bytes)
local wait_ms = tonumber(redis.call('HGET', KEYS[1], 'queue_timeout_ms') or S.ttl)
redis.call('ZADD', S.deadlines, now + math.min(wait_ms, S.ttl), ARGV[1])
enqueue(S, ARGV[1], owner, ARGV[8], now)
dispatch(S, now)
redis.call('PUBLISH', S.changed, ARGV[1])
return {'queued'}
