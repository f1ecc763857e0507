-- Accept a job in one atomic step: idempotency, the queue bound, input, metadata and arq's job record.
-- KEYS: 1 arq's queue, 2 arq's job record, 3 input, 4 metadata, 5 counters, 6 running set,
--       7 (optional) the idempotency key
-- ARGV: 1 job id, 2 created (ms, to the microsecond: the queue score, so arrival order is queue order), 3 ttl (ms), 4 max queued, 5 arq's job record,
--       6 the image, 7 metadata as a flat JSON list, 8 the enqueued channel, 9 the metadata key prefix
-- Returns {'existing', first job's id} | {'full'} | {'created', jobs ahead that no worker has started}
if KEYS[7] then
  local first = redis.call('GET', KEYS[7])
  if first and redis.call('EXISTS', ARGV[9] .. first) == 1 then
    return {'existing', first}
  end
end
local ahead = redis.call('ZCARD', KEYS[1])
if ahead >= tonumber(ARGV[4]) then return {'full'} end
redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[3])
redis.call('HSET', KEYS[4], unpack(cjson.decode(ARGV[7])))
redis.call('PEXPIRE', KEYS[4], ARGV[3])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
if KEYS[7] then redis.call('SET', KEYS[7], ARGV[1], 'PX', ARGV[3]) end
redis.call('HINCRBY', KEYS[5], 'submitted', 1)
redis.call('PUBLISH', ARGV[8], '1')
-- Running jobs stay in arq's queue until they end: they are not ahead of anyone. (load.lua counts them one
-- by one; here, on the hot path, all running jobs are taken to be ahead, as all but retried ones are.)
local running = redis.call('ZCOUNT', KEYS[6], ARGV[2], '+inf')
return {'created', math.max(0, redis.call('ZRANK', KEYS[1], ARGV[1]) - running)}
