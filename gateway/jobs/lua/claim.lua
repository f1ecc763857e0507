-- Lease the webhook deliveries that are due. A leased delivery is due again only when its lease ends, so
-- another process takes it over if this one dies before it records the attempt.
-- KEYS: 1 the due set
-- ARGV: 1 now (ms), 2 the lease (ms), 3 at most this many
-- Returns {{id, fields of the delivery}, ...}
local now = tonumber(ARGV[1])
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local key = 'segserve:delivery:' .. id
  local fields = redis.call('HGETALL', key)
  local waits = false
  if #fields == 0 then
    redis.call('ZREM', KEYS[1], id)  -- expired
  elseif redis.call('HGET', key, 'type') == 'job.completed' then
    -- A job's events go out in order: its end waits while its start is still being delivered.
    local summary = redis.call('HGET', 'segserve:job:' .. redis.call('HGET', key, 'job_id'), 'deliveries')
    local started = summary and cjson.decode(summary)['job.started']
    waits = started and started.state == 'pending'
  end
  if #fields > 0 then
    redis.call('ZADD', KEYS[1], now + (waits and 200 or tonumber(ARGV[2])), id)
    if not waits then table.insert(claimed, {id, fields}) end
  end
end
return claimed
