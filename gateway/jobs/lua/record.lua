#!lua flags=allow-oom
-- One attempt at a webhook delivery has ended: count it, then schedule the next or close the delivery.
-- KEYS: 1 the delivery, 2 the due set, 3 counters
-- ARGV: 1 its id, 2 its state now ('pending', 'delivered' or 'failed'), 3 the receiver's HTTP status or '',
--       4 when to try next (ms), if pending, 5 the body, kept from the first attempt on so every try sends
--       the same ('' when it could not be made), 6 how long to keep a closed delivery (ms), 7 the attempt's
--       lease token, 8 the metadata key prefix
-- Returns the number of attempts so far, or 0 for a delivery that has expired or was leased again since
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[7] then return 0 end
redis.call('HDEL', KEYS[1], 'lease')  -- the attempt is over
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'last_status', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[1], 'body', ARGV[5]) end
if ARGV[2] == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
  redis.call('HINCRBY', KEYS[3], 'webhooks:retried', 1)
else
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('HINCRBY', KEYS[3], 'webhooks:' .. ARGV[2], 1)
end
-- The job object shows each event's delivery.
local job_key = ARGV[8] .. redis.call('HGET', KEYS[1], 'job_id')
local summary = redis.call('HGET', job_key, 'deliveries')
local kind = redis.call('HGET', KEYS[1], 'type')
if summary then
  summary = cjson.decode(summary)
  if summary[kind] and summary[kind].id == ARGV[1] then
    summary[kind] = {id = ARGV[1], state = ARGV[2], attempts = attempts, last_status = tonumber(ARGV[3]) or cjson.null}
    redis.call('HSET', job_key, 'deliveries', cjson.encode(summary))
  end
end
return attempts
