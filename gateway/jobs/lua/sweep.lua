#!lua flags=allow-oom
-- The jobs whose blobs may go now: those due in the blob expiries whose job is gone (deleted, or expired with
-- its TTL). A job that lives on is looked at again when its metadata would expire. Each one returned is
-- leased (due again after the lease), so a sweeper that dies before deleting leaves it to the next; and it
-- no longer counts as pending (a job that expired while queued never ended by a step of its own).
-- KEYS: 1 blob expiries, 2 pending inputs, 3 counters
-- ARGV: 1 now (ms), 2 at most this many, 3 the metadata key prefix, 4 the lease (ms)
-- Returns {job id, ...}
local now = tonumber(ARGV[1])
local gone = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))) do
  local ttl = redis.call('PTTL', ARGV[3] .. id)
  if ttl > 0 then
    redis.call('ZADD', KEYS[1], now + ttl, id)
  elseif ttl == -1 then
    redis.call('ZADD', KEYS[1], now + 3600 * 1000, id)  -- no TTL (never set by segserve): look again later
  else
    release_pending(KEYS[2], KEYS[3], id)
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), id)
    table.insert(gone, id)
  end
end
return gone
