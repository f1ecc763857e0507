#!lua flags=allow-oom
-- Forget a job now. A running one is left to its worker, whose completion then finds it gone, keeps nothing
-- and removes what it wrote; arq removes its own records of the try when the try ends. The caller deletes the
-- blobs; the sweeper looks again once any try has ended. Allowed when Redis is out of memory: it frees room.
-- KEYS: 1 metadata, 2 arq's queue, 3 arq's job record, 4 arq's in-progress key, 5 arq's retry counter,
--       6 counters, 7 pending inputs, 8 blob expiries, 9 webhook deliveries due
-- ARGV: 1 job id, 2 the changed channel, 3 a delivery's key prefix, 4 when the sweeper should look (ms)
-- Its webhook deliveries go too: they hold its result.
local summary = redis.call('HGET', KEYS[1], 'deliveries')
for _, delivery in pairs(summary and cjson.decode(summary) or {}) do
  redis.call('DEL', ARGV[3] .. delivery.id)
  redis.call('ZREM', KEYS[9], delivery.id)
end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[5])
  release_pending(KEYS[7], KEYS[6], ARGV[1])
end
redis.call('ZADD', KEYS[8], ARGV[4], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
