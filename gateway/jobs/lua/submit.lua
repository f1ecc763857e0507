#!lua
-- Accept a job in one atomic step: idempotency, the queue's bounds, metadata and arq's job record. The input is
-- in the blob store already. No flags: Redis refuses the whole step when it is out of memory.
-- KEYS: 1 arq's queue, 2 arq's job record, 3 metadata, 4 counters, 5 running set, 6 pending inputs,
--       7 blob expiries, 8 (optional) the idempotency key
-- ARGV: 1 job id, 2 created (ms, to the microsecond: the queue score, so arrival order is queue order),
--       3 ttl (ms), 4 max queued, 5 arq's job record, 6 metadata as a flat JSON list, 7 the enqueued channel,
--       8 the metadata key prefix, 9 the input's bytes, 10 max pending bytes, 11 the share of maxmemory to stop at
-- Returns {'existing', first job's id} | {'full', 'queue' | 'bytes' | 'memory'} |
--         {'created', jobs ahead that no worker has started}
if KEYS[8] then
  local first = redis.call('GET', KEYS[8])
  if first and redis.call('EXISTS', ARGV[8] .. first) == 1 then
    return {'existing', first}
  end
end
local refused = refusal(KEYS[1], KEYS[4], ARGV[4], ARGV[9], ARGV[10], ARGV[11])
if refused then return {'full', refused} end
redis.call('HSET', KEYS[3], unpack(cjson.decode(ARGV[6])))
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
add_pending(KEYS[6], KEYS[4], ARGV[1], ARGV[9])
-- Its blobs go once the job has gone (the sweeper looks then, and again while the job lives on).
redis.call('ZADD', KEYS[7], ARGV[2] + ARGV[3], ARGV[1])
if KEYS[8] then redis.call('SET', KEYS[8], ARGV[1], 'PX', ARGV[3]) end
redis.call('HINCRBY', KEYS[4], 'submitted', 1)
redis.call('PUBLISH', ARGV[7], '1')
-- Running jobs stay in arq's queue until they end: they are not ahead of anyone. (load.lua counts them one
-- by one; here, on the hot path, all running jobs are taken to be ahead, as all but retried ones are.)
local running = redis.call('ZCOUNT', KEYS[5], ARGV[2], '+inf')
return {'created', math.max(0, redis.call('ZRANK', KEYS[1], ARGV[1]) - running)}
