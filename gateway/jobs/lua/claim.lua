#!lua flags=allow-oom
-- Lease the webhook deliveries that are due. A leased delivery is due again only when its lease ends, so
-- another process takes it over if this one dies before it records the attempt. The caller's slots are
-- shared between owners: a delivery whose owner holds its share of them already waits a moment, so that one
-- owner's slow or hanging receiver delays only that owner's deliveries.
-- KEYS: 1 the due set
-- ARGV: 1 now (ms), 2 the lease (ms), 3 at most this many, 4 this claim's lease token (record.lua checks it,
--       so an attempt that outlived its lease cannot record over a later one), 5 a delivery's key prefix,
--       6 the metadata key prefix, 7 the most attempts of one owner at once, 8 JSON {owner: attempts the
--       caller runs for it now}
-- Returns {{id, fields of the delivery}, ...}
local now = tonumber(ARGV[1])
local share, busy = tonumber(ARGV[7]), cjson.decode(ARGV[8])
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local key = ARGV[5] .. id
  local waits_until = nil
  if redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', KEYS[1], id)  -- expired
  elseif redis.call('HGET', key, 'type') == 'job.completed' then
    -- A job's events go out in order: its end waits while its start is pending, until just after the start's
    -- next attempt (or, while that attempt runs, a moment).
    local summary = redis.call('HGET', ARGV[6] .. redis.call('HGET', key, 'job_id'), 'deliveries')
    local started = summary and cjson.decode(summary)['job.started']
    local start_due = started and started.state == 'pending' and redis.call('ZSCORE', KEYS[1], started.id)
    if start_due then
      local running = redis.call('HEXISTS', ARGV[5] .. started.id, 'lease') == 1
      waits_until = running and now + 200 or math.max(now, tonumber(start_due)) + 100
    end
  end
  local owner = waits_until == nil and redis.call('HGET', key, 'owner')
  if owner and (busy[owner] or 0) >= share then
    waits_until = now + 1000  -- its owner's share of the slots is taken: others' deliveries go first
  end
  if waits_until then
    redis.call('ZADD', KEYS[1], waits_until, id)
  elseif redis.call('EXISTS', key) == 1 then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    redis.call('HSET', key, 'lease', ARGV[4])
    busy[owner] = (busy[owner] or 0) + 1
    table.insert(claimed, {id, redis.call('HGETALL', key)})
  end
end
return claimed
