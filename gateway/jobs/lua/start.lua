#!lua flags=allow-oom
-- A worker takes a job: check it may still run, mark it started. Allowed when Redis is out of memory: the
-- job was accepted, and its few bytes of state must not hold it up.
-- KEYS: 1 metadata, 2 running set, 3 webhook deliveries due
-- ARGV: 1 job id, 2 now (ms), 3 deadline of this try (ms), 4 the changed channel, 5 a delivery's key prefix, 6 S
-- The try's fence is the job's attempt count after this step: complete and release refuse any other.
-- Returns {'gone'} (deleted or expired) | {'ended'} (canceled, ended by an earlier try, or not started in
-- time) | {'run', metadata}
local S = cjson.decode(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
if redis.call('HEXISTS', KEYS[1], 'status') == 1 then return {'ended'} end
local start_by = redis.call('ZSCORE', S.deadlines, ARGV[1])
if start_by and tonumber(start_by) <= tonumber(ARGV[2]) then
  expire(S, ARGV[1], ARGV[2])
  return {'ended'}
end
redis.call('ZREM', S.deadlines, ARGV[1])  -- started: a later try of this run (after a crash) never expires
redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)  -- every try counts, across retries of the job too
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])  -- tries that ended without a word (SIGKILL)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
queue_delivery({due = KEYS[3], prefix = ARGV[5]}, KEYS[1], ARGV[1], 'start', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[1] .. ' ' .. S.started)  -- who waits for its end need not look
return {'run', redis.call('HGETALL', KEYS[1])}
