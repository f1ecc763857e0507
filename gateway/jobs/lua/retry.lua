-- A failed or canceled job goes back into the queue under its own id; its attempts are kept.
-- KEYS: 1 metadata, 2 input, 3 arq's queue, 4 arq's job record, 5 arq's in-progress key, 6 arq's retry counter
-- ARGV: 1 job id, 2 now (ms, the queue score), 3 ttl (ms), 4 arq's job record, 5 the enqueued channel,
--       6 the changed channel
-- Returns {'missing'} | {'refused', status} | {'no_input'} | {'queued'}
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status and redis.call('EXISTS', KEYS[5]) == 0 and not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  status = 'failed'  -- arq dropped it without an outcome: it reads as failed, and may be tried again
end
if status ~= 'failed' and status ~= 'canceled' then return {'refused', status or 'active'} end
-- A job canceled while it ran keeps arq's records until that try ends; queued again now, arq's end of the
-- old try would take the new one out of the queue.
if redis.call('EXISTS', KEYS[5]) == 1 then return {'refused', 'ending'} end
if redis.call('EXISTS', KEYS[2]) == 0 then return {'no_input'} end
redis.call('HDEL', KEYS[1], 'status', 'finished_at', 'started_at', 'result', 'error', 'timings_ms', 'deliveries')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[6])
redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[5], '1')
redis.call('PUBLISH', ARGV[6], ARGV[1])
return {'queued'}
