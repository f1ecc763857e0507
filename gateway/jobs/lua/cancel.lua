#!lua flags=allow-oom
-- A queued job leaves the queue and never runs; a running one is marked, and its completion keeps nothing.
-- The input stays as long as the job, for a retry. Allowed when Redis is out of memory: it frees room.
-- KEYS: 1 metadata, 2 arq's queue, 3 arq's job record, 4 arq's in-progress key, 5 arq's retry counter,
--       6 counters, 7 pending inputs, 8 webhook deliveries due
-- ARGV: 1 job id, 2 now (ms), 3 the changed channel, 4 ttl (ms), 5 a delivery's key prefix, 6 S
-- Returns 'missing' | 'canceled' | the status the job had already ended with
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local current = redis.call('HGET', KEYS[1], 'status')
if current then return current end
local S = cjson.decode(ARGV[6])
local owner = redis.call('HGET', KEYS[1], 'owner')
local waiting = redis.call('ZSCORE', S.waiting .. owner, ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 0 and not waiting and not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 'failed'  -- arq dropped it without an outcome: it reads as failed (see records.py)
end
if redis.call('EXISTS', KEYS[4]) == 0 then  -- a running try leaves the backlog when it completes
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[5])
  leave_backlog(S, ARGV[1], owner)
  dispatch(S, tonumber(ARGV[2]))
end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])  -- kept as long as any ended job, as expires_at says
redis.call('HINCRBY', KEYS[6], 'finished:canceled', 1)
queue_delivery({due = KEYS[8], prefix = ARGV[5]}, KEYS[1], ARGV[1], 'completed', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 'canceled'
