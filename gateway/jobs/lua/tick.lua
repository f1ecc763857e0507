#!lua flags=allow-oom
-- What time alone changes, looked at every second by each gateway: jobs whose deadline to start has passed
-- end 'expired'; owners' dispatched sets drop jobs no longer in arq's queue (a try that ended without a step
-- of ours); then a dispatch, so that no queued job waits while a slot is free. Allowed when Redis is out of
-- memory: it only ends and moves accepted work.
-- ARGV: 1 now (ms), 2 at most this many expiries, 3 S
-- Returns {jobs expired, jobs handed to arq}
local S = cjson.decode(ARGV[3])
local now = tonumber(ARGV[1])
local expired = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', S.deadlines, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local meta = S.job .. id
  if redis.call('EXISTS', meta) == 0 or redis.call('HEXISTS', meta, 'status') == 1
      or redis.call('EXISTS', S.in_progress .. id) == 1 then
    redis.call('ZREM', S.deadlines, id)
  else
    expire(S, id, now)
    expired = expired + 1
  end
end
for _, owner in ipairs(redis.call('ZRANGE', S.active, 0, -1)) do
  for _, id in ipairs(redis.call('SMEMBERS', S.dispatched .. owner)) do
    if not redis.call('ZSCORE', S.queue, id) then redis.call('SREM', S.dispatched .. owner, id) end
  end
end
return {expired, dispatch(S, now)}
