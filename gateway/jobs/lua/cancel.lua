-- A queued job leaves the queue and never runs; a running one is marked, and its completion keeps nothing.
-- KEYS: 1 metadata, 2 arq's queue, 3 arq's job record, 4 arq's in-progress key, 5 input, 6 counters
-- ARGV: 1 job id, 2 now (ms), 3 the done channel, 4 ttl (ms)
-- Returns 'missing' | 'canceled' | the status the job had already ended with
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
local current = redis.call('HGET', KEYS[1], 'status')
if current then return current end
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[5])
end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])  -- kept as long as any ended job, as expires_at says
redis.call('HINCRBY', KEYS[6], 'finished:canceled', 1)
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 'canceled'
