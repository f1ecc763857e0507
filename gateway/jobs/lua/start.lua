-- A worker takes a job: check it may still run, mark it started, hand over its input.
-- KEYS: 1 metadata, 2 input, 3 running set
-- ARGV: 1 job id, 2 now (ms), 3 deadline of this try (ms), 4 the changed channel
-- Returns {'gone'} (deleted or expired) | {'ended'} (canceled, or ended by an earlier try) |
--         {'no_input', metadata} | {'run', metadata, image}
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {'gone'} end
if redis.call('HEXISTS', KEYS[1], 'status') == 1 then return {'ended'} end
local image = redis.call('GET', KEYS[2])
if not image then return {'no_input', meta} end
redis.call('HSET', KEYS[1], 'started_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)  -- every try counts, across retries of the job too
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])  -- tries that ended without a word (SIGKILL)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
queue_delivery(KEYS[1], ARGV[1], 'start', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return {'run', redis.call('HGETALL', KEYS[1]), image}
