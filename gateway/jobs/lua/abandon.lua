#!lua flags=allow-oom
-- arq ended a job without our outcome (a try past arq's time limit, or too many tries after worker crashes):
-- it fails with a code and a time, instead of vanishing. Anything else (ended, gone, or still arq's to run
-- again) is left as it is.
-- KEYS: 1 metadata, 2 arq's queue, 3 arq's in-progress key, 4 running set, 5 counters, 6 pending inputs,
--       7 webhook deliveries due
-- ARGV: 1 job id, 2 now (ms), 3 ttl (ms), 4 the error as JSON, 5 the changed channel, 6 a delivery's key prefix,
--       7 S
-- Returns 'failed' when it failed the job, else ''
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'status') == 1 then return '' end
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('ZSCORE', KEYS[2], ARGV[1]) then return '' end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[2], 'error', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])  -- its input is kept as long, for a retry
local S = cjson.decode(ARGV[7])
redis.call('ZREM', KEYS[4], ARGV[1])
leave_backlog(S, ARGV[1], redis.call('HGET', KEYS[1], 'owner'))
dispatch(S, tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[5], 'finished:failed', 1)
queue_delivery({due = KEYS[7], prefix = ARGV[6]}, KEYS[1], ARGV[1], 'completed', ARGV[2])
redis.call('PUBLISH', ARGV[5], ARGV[1])
return 'failed'
