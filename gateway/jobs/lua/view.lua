#!lua flags=no-writes
-- The fair order as it stands, for the gateways' positions and ETAs (gateway.jobs.fairness): one read shared
-- by every job a gateway shows, instead of one walk of the queues per job.
-- ARGV: 1 now (ms), 2 at most this many owners, 3 S
-- Returns {jobs in arq's queue not started, jobs ended so far, {owner, pass, weight, jobs waiting}, ...}
local S = cjson.decode(ARGV[3])
local in_arq = redis.call('ZCARD', S.queue) - redis.call('ZCOUNT', S.running, ARGV[1], '+inf')
local ended = 0
for _, status in ipairs({'succeeded', 'failed', 'canceled', 'expired'}) do
  ended = ended + tonumber(redis.call('HGET', S.stats, 'finished:' .. status) or '0')
end
local answer = {math.max(0, in_arq), ended}
local owners = redis.call('ZRANGE', S.active, 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
for i = 1, #owners, 2 do
  local owner = owners[i]
  local weight = redis.call('HGET', S.tenant .. owner, 'weight') or '1'
  table.insert(answer, {owner, owners[i + 1], weight, redis.call('ZCARD', S.waiting .. owner)})
end
return answer
