#!lua
-- A failed or canceled job goes back into the queue under its own id; its attempts are kept. It counts
-- against the queue's bounds as a new job does; no flags: refused whole when Redis is out of memory.
-- KEYS: 1 metadata, 2 arq's queue, 3 arq's job record, 4 arq's in-progress key, 5 arq's retry counter,
--       6 counters, 7 pending inputs
-- ARGV: 1 job id, 2 now (ms, the queue score), 3 ttl (ms), 4 arq's job record, 5 the enqueued channel,
--       6 the changed channel, 7 max queued, 8 max pending bytes, 9 the share of maxmemory to stop at
-- Returns {'missing'} | {'refused', status} | {'no_input'} | {'full', 'queue' | 'bytes' | 'memory'} | {'queued'}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status and redis.call('EXISTS', KEYS[4]) == 0 and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  status = 'failed'  -- arq dropped it without an outcome: it reads as failed, and may be tried again
end
if status ~= 'failed' and status ~= 'canceled' then return {'refused', status or 'active'} end
-- A job canceled while it ran keeps arq's records until that try ends; queued again now, arq's end of the
-- old try would take the new one out of the queue.
if redis.call('EXISTS', KEYS[4]) == 1 then return {'refused', 'ending'} end
if redis.call('HEXISTS', KEYS[1], 'input_gone') == 1 then return {'no_input'} end
local bytes = redis.call('HGET', KEYS[1], 'input_bytes') or '0'
local refused = refusal(KEYS[2], KEYS[6], ARGV[7], bytes, ARGV[8], ARGV[9])
if refused then return {'full', refused} end
redis.call('HDEL', KEYS[1], 'status', 'finished_at', 'started_at', 'result', 'error', 'timings_ms', 'deliveries',
  'mask', 'overlay')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('DEL', KEYS[5])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
add_pending(KEYS[7], KEYS[6], ARGV[1], bytes)
redis.call('PUBLISH', ARGV[5], '1')
redis.call('PUBLISH', ARGV[6], ARGV[1])
return {'queued'}
