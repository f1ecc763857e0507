-- Forget a job now. A running one is left to its worker, whose completion then finds it gone and keeps
-- nothing; arq removes its own records of the try when the try ends.
-- KEYS: 1 metadata, 2 input, 3 mask, 4 arq's queue, 5 arq's job record, 6 arq's in-progress key,
--       7 arq's retry counter
-- ARGV: 1 job id, 2 the changed channel
-- Its webhook deliveries go too: they hold its result.
local summary = redis.call('HGET', KEYS[1], 'deliveries')
for _, delivery in pairs(summary and cjson.decode(summary) or {}) do
  redis.call('DEL', 'segserve:delivery:' .. delivery.id)
  redis.call('ZREM', 'segserve:deliveries', delivery.id)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
if redis.call('EXISTS', KEYS[6]) == 0 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('DEL', KEYS[5], KEYS[7])
end
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
