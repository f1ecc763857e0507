#!lua flags=allow-oom
-- Forget a job now. A running one is left to its worker, whose completion then finds it gone, keeps nothing
-- and removes what it wrote; arq removes its own records of the try when the try ends. The caller deletes the
-- blobs; the sweeper looks again once any try has ended. Allowed when Redis is out of memory: it frees room.
-- KEYS: 1 metadata, 2 arq's queue, 3 arq's job record, 4 arq's in-progress key, 5 arq's retry counter,
--       6 counters, 7 pending inputs, 8 blob expiries, 9 webhook deliveries due
-- ARGV: 1 job id, 2 the changed channel, 3 a delivery's key prefix, 4 when the sweeper should look (ms),
--       5 now (ms), 6 S
-- Its webhook deliveries go too: they hold its result.
local summary = redis.call('HGET', KEYS[1], 'deliveries')
for _, delivery in pairs(summary and cjson.decode(summary) or {}) do
  redis.call('DEL', ARGV[3] .. delivery.id)
  redis.call('ZREM', KEYS[9], delivery.id)
end
local S = cjson.decode(ARGV[6])
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1])
if owner then redis.call('ZREM', S.jobs_of .. owner, ARGV[1]) end
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3], KEYS[5])
end
-- A running try's place in its owner's share is freed now: its worker's completion will find the job gone.
leave_backlog(S, ARGV[1], owner or '')
dispatch(S, tonumber(ARGV[5]))
redis.call('ZADD', KEYS[8], ARGV[4], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
