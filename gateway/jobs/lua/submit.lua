#!lua
-- Accept a job in one atomic step: idempotency, the bounds (the whole backlog's and the owner's own), metadata,
-- arq's job record, the owner's queue, then a dispatch. The input is in the blob store already. No flags:
-- Redis refuses the whole step when it is out of memory.
-- KEYS: 1 arq's job record, 2 metadata, 3 blob expiries, 4 (optional) the idempotency key
-- ARGV: 1 job id, 2 created (ms, to the microsecond), 3 max queued, 4 arq's job record, 5 metadata as a flat
--       JSON list, 6 the input's bytes, 7 max pending bytes, 8 the share of maxmemory to stop at, 9 the owner,
--       10 its place in the owner's queue (priority, then arrival), 11 its deadline to start (ms),
--       12 the owner's settings as JSON {weight, max_queued, max_running, running_share, rate, burst}, 13 S
-- Returns {'existing', first job's id} | {'full', 'queue' | 'bytes' | 'memory' | 'key_queue' | 'key_rate', ms
--         to come back} | {'created', jobs ahead in arq's queue or -1, place in the owner's queue or -1,
--         tokens left in the owner's rate bucket (-1: no rate), the owner's jobs accepted and not ended}
local S = cjson.decode(ARGV[13])
local job_id, now, owner = ARGV[1], tonumber(ARGV[2]), ARGV[9]
if KEYS[4] then
  local first = redis.call('GET', KEYS[4])
  if first and redis.call('EXISTS', S.job .. first) == 1 then
    return {'existing', first}
  end
end
local refused = refusal(S.backlog, S.stats, ARGV[3], ARGV[6], ARGV[7], ARGV[8])
if refused then return {'full', refused, 5000} end
local tenant = cjson.decode(ARGV[12])
local admission = key_admission(S, owner, tenant, now)
if admission.refused then return {'full', admission.refused, admission.retry_ms} end
if tenant.rate > 0 then
  redis.call('HSET', S.tenant .. owner, 'tokens', admission.tokens - 1, 'refilled', now)
end
redis.call('HSET', S.tenant .. owner, 'weight', tenant.weight, 'max_running', tenant.max_running,
  'running_share', tenant.running_share)
redis.call('HSET', KEYS[2], unpack(cjson.decode(ARGV[5])))
redis.call('PEXPIRE', KEYS[2], S.ttl)
redis.call('SET', KEYS[1], ARGV[4], 'PX', S.ttl)
add_pending(S.pending, S.stats, job_id, ARGV[6])
-- Its blobs go once the job has gone (the sweeper looks then, and again while the job lives on).
redis.call('ZADD', KEYS[3], now + S.ttl, job_id)
redis.call('ZADD', S.deadlines, ARGV[11], job_id)
redis.call('ZADD', S.jobs_of .. owner, now, job_id)
-- The owner's index forgets what has surely gone: a job lives at most its wait, a try and a ttl after its end.
redis.call('ZREMRANGEBYSCORE', S.jobs_of .. owner, '-inf', '(' .. (now - 2 * S.ttl - 3600 * 1000))
if KEYS[4] then redis.call('SET', KEYS[4], job_id, 'PX', S.ttl) end
redis.call('HINCRBY', S.stats, 'submitted', 1)
enqueue(S, job_id, owner, ARGV[10], now)
dispatch(S, now)
local tokens = tenant.rate > 0 and math.floor(admission.tokens - 1) or -1
local rank = redis.call('ZRANK', S.queue, job_id)
if rank then
  -- Running jobs stay in arq's queue until they end, mostly at its head: they are not ahead of anyone.
  local running = redis.call('ZCOUNT', S.running, now, '+inf')
  return {'created', math.max(0, rank - running), -1, tokens, admission.queued + 1}
end
return {'created', -1, redis.call('ZRANK', S.waiting .. owner, job_id), tokens, admission.queued + 1}
