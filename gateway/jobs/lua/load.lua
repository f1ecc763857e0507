#!lua flags=no-writes
-- Everything a job's state is derived from, read in one atomic step: read apart, a job that ends between
-- the reads would look neither queued, running nor ended.
-- KEYS: 1 metadata, 2 arq's in-progress key, 3 arq's queue
-- ARGV: 1 job id, 2 arq's in-progress key prefix, 3 the owners' queues' key prefix
-- Returns false for an unknown job, else {metadata, 1 if running else 0, jobs ahead in arq's queue or -1 when
-- not there, its place in its owner's queue or -1 when not there}
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return false end
local running = redis.call('EXISTS', KEYS[2])
local position = -1
-- The jobs ahead in arq's queue are those before it (score, then id), less those already running. The
-- dispatch keeps that queue short (two in-flight windows), so this look is too.
local rank = running == 0 and redis.call('ZRANK', KEYS[3], ARGV[1])
if rank then
  position = 0
  if rank > 0 then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[3], 0, rank - 1)) do
      if redis.call('EXISTS', ARGV[2] .. id) == 0 then position = position + 1 end
    end
  end
end
local place = -1
if running == 0 and not rank then
  local owner = redis.call('HGET', KEYS[1], 'owner') or ''
  place = redis.call('ZRANK', ARGV[3] .. owner, ARGV[1]) or -1
end
return {meta, running, position, place}
