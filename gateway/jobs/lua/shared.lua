-- Shared by every step (the store puts it before each script): what several steps do alike.

-- Queue the job's webhook delivery of `event` ('start' or 'completed'), if it asked for one, atomically with
-- the change of state that causes it: a durable unit of work (a hash under outbox.prefix, due in outbox.due)
-- holding a snapshot of the job at this moment. outbox = {due = the due set, prefix = a delivery's key prefix}.
local function queue_delivery(outbox, meta_key, job_id, event, now)
  local url = redis.call('HGET', meta_key, 'webhook')
  if not url then return end
  local asked = false
  for _, wanted in ipairs(cjson.decode(redis.call('HGET', meta_key, 'webhook_events'))) do
    if wanted == event then asked = true end
  end
  local kind = event == 'start' and 'job.started' or 'job.completed'
  local summary = cjson.decode(redis.call('HGET', meta_key, 'deliveries') or '{}')
  if not asked or summary[kind] then return end  -- one start per run of the job, not one per try
  -- Every event of the job gets its own id (a receiver drops repeats by id), the same on each retry.
  local n = redis.call('HINCRBY', meta_key, 'events', 1)
  local id = 'msg_' .. string.sub(redis.sha1hex(job_id .. ':' .. n), 1, 32)
  local key = outbox.prefix .. id
  redis.call('HSET', key, 'job_id', job_id, 'type', kind, 'url', url, 'owner', redis.call('HGET', meta_key, 'owner'),
    'snapshot', cjson.encode(redis.call('HGETALL', meta_key)), 'created', now, 'attempts', 0, 'state', 'pending')
  redis.call('PEXPIRE', key, 8 * 24 * 3600 * 1000)  -- past any retry window; record.lua shortens it at the end
  redis.call('ZADD', outbox.due, now, id)
  summary[kind] = {id = id, state = 'pending', attempts = 0, last_status = cjson.null}
  redis.call('HSET', meta_key, 'deliveries', cjson.encode(summary))
end

-- Why a job cannot be queued now, or nil: the backlog holds max_queued jobs; the inputs of jobs not yet ended
-- would pass max_bytes (a lone job is always let in, however large); or Redis nears its maxmemory, where the
-- later steps of the jobs it holds must still find room.
local function refusal(backlog, stats, max_queued, bytes, max_bytes, memory_fraction)
  if redis.call('ZCARD', backlog) >= tonumber(max_queued) then return 'queue' end
  local pending = tonumber(redis.call('HGET', stats, 'pending_bytes') or '0')
  if pending > 0 and pending + tonumber(bytes) > tonumber(max_bytes) then return 'bytes' end
  local info = redis.call('INFO', 'memory')
  local limit = tonumber(string.match(info, 'maxmemory:(%d+)'))
  if limit > 0 and tonumber(string.match(info, 'used_memory:(%d+)')) > limit * tonumber(memory_fraction) then
    return 'memory'
  end
  return nil
end

-- A job's input counts against the byte budget from its acceptance until it ends.
local function add_pending(pending, stats, job_id, bytes)
  redis.call('HSET', pending, job_id, bytes)
  redis.call('HINCRBY', stats, 'pending_bytes', bytes)
end

local function release_pending(pending, stats, job_id)
  local bytes = redis.call('HGET', pending, job_id)
  if bytes then
    redis.call('HDEL', pending, job_id)
    redis.call('HINCRBY', stats, 'pending_bytes', -tonumber(bytes))
  end
end

-- Fair sharing between owners (API keys). S is the store's layout (keys.layout, with the ttl in ms and the
-- hand-off's least size), each step's last argument. An owner's jobs wait in S.waiting..owner until dispatch
-- hands them to arq's queue; S.active orders the owners with waiting jobs by their pass, which grows by
-- 1/weight with each job handed over (stride scheduling: weighted fair queueing over unit-cost jobs). An
-- owner that comes back after a pause starts at the current virtual time (the pass last served), so an idle
-- owner saves up no credit.

-- A job enters its owner's queue: at submission, on a retry.
local function enqueue(S, job_id, owner, score, now)
  redis.call('ZADD', S.waiting .. owner, score, job_id)
  redis.call('ZADD', S.backlog, now, job_id)
  if not redis.call('ZSCORE', S.active, owner) then
    local vtime = tonumber(redis.call('HGET', S.stats, 'vtime') or '0')
    local pass = tonumber(redis.call('HGET', S.tenant .. owner, 'pass') or '0')
    redis.call('ZADD', S.active, math.max(pass, vtime), owner)
  end
end

-- A job leaves the backlog for good (it ended, or is deleted), wherever it was.
local function leave_backlog(S, job_id, owner)
  redis.call('ZREM', S.backlog, job_id)
  redis.call('ZREM', S.deadlines, job_id)
  redis.call('SREM', S.dispatched .. owner, job_id)
  if redis.call('ZREM', S.waiting .. owner, job_id) == 1 and redis.call('ZCARD', S.waiting .. owner) == 0 then
    redis.call('ZREM', S.active, owner)
  end
  release_pending(S.pending, S.stats, job_id)
end

-- The most jobs of `owner` arq's queue may hold at once (waiting there or running): its max_running, else
-- its share of the slots the live workers have, else no limit.
local function running_limit(S, owner, slots)
  local limits = redis.call('HMGET', S.tenant .. owner, 'max_running', 'running_share')
  local fixed = tonumber(limits[1] or '0')
  if fixed > 0 then return fixed end
  local share = tonumber(limits[2] or '1')
  if share >= 1 or slots == 0 then return math.huge end
  return math.max(1, math.ceil(share * slots))
end

-- A job that was not started in time ends 'expired' (its input stays, for a retry).
local function expire(S, job_id, now)
  local meta = S.job .. job_id
  local owner = redis.call('HGET', meta, 'owner') or ''
  redis.call('ZREM', S.queue, job_id)  -- handed to arq but not started: arq never sees it
  redis.call('DEL', S.arq_job .. job_id, S.arq_retry .. job_id)
  leave_backlog(S, job_id, owner)
  redis.call('HSET', meta, 'status', 'expired', 'finished_at', now)
  redis.call('PEXPIRE', meta, S.ttl)
  redis.call('HINCRBY', S.stats, 'finished:expired', 1)
  queue_delivery({due = S.due, prefix = S.delivery}, meta, job_id, 'completed', now)
  redis.call('PUBLISH', S.changed, job_id)
end

-- The owner to take from next: the lowest pass among those under their running limit; nil when none is.
-- Its cost grows with the owners that have work and are at their limit, never with the jobs waiting.
local function next_owner(S, slots)
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', S.active, start, start + 15, 'WITHSCORES')
    if #batch == 0 then return nil end
    for i = 1, #batch, 2 do
      local owner = batch[i]
      if redis.call('SCARD', S.dispatched .. owner) < running_limit(S, owner, slots) then
        return owner, tonumber(batch[i + 1])
      end
    end
    start = start + 16
  end
end

-- Hand waiting jobs to arq's queue, fairly, until it holds the running jobs and as many again (twice the
-- slots of the live workers, at least S.min_window): arq stays the hand-off, and stays short, so a job of an
-- owner that just arrived waits behind one in-flight window at most. Every step that frees a place calls it.
local function dispatch(S, now)
  local slots = tonumber(redis.call('HGET', S.stats, 'fleet_slots') or '0')
  local room = math.max(S.min_window, 2 * slots) - redis.call('ZCARD', S.queue)
  local handed, looked = 0, 0
  while room > 0 and looked < room + 1000 do
    local owner, pass = next_owner(S, slots)
    if not owner then break end
    looked = looked + 1
    local waiting = S.waiting .. owner
    local job_id = redis.call('ZPOPMIN', waiting)[1]
    if job_id then
      local meta = S.job .. job_id
      if redis.call('EXISTS', meta) == 0 or redis.call('HEXISTS', meta, 'status') == 1 then
        redis.call('ZREM', S.backlog, job_id)  -- gone or ended meanwhile
      elseif tonumber(redis.call('ZSCORE', S.deadlines, job_id) or math.huge) <= now then
        expire(S, job_id, now)
      else
        handed, room = handed + 1, room - 1
        redis.call('ZADD', S.queue, now + handed / 1000, job_id)  -- in the order handed over
        redis.call('SADD', S.dispatched .. owner, job_id)
        redis.call('HSET', S.stats, 'vtime', pass)
        pass = pass + 1 / tonumber(redis.call('HGET', S.tenant .. owner, 'weight') or '1')
        redis.call('HSET', S.tenant .. owner, 'pass', pass)
      end
    end
    if redis.call('ZCARD', waiting) == 0 then
      redis.call('ZREM', S.active, owner)
    else
      redis.call('ZADD', S.active, pass, owner)
    end
  end
  if handed > 0 then redis.call('PUBLISH', S.enqueued, '1') end
  return handed
end

-- Whether `owner` may queue another job now, by its own limits: limits = {max_queued (0: none), rate (jobs
-- a second, 0: none), burst}. Returns {refused = false | 'key_queue' | 'key_rate', retry_ms = when to come
-- back, tokens = what its rate bucket holds now, queued = its jobs accepted and not ended}.
local function key_admission(S, owner, limits, now)
  local queued = redis.call('ZCARD', S.waiting .. owner) + redis.call('SCARD', S.dispatched .. owner)
  local answer = {refused = false, retry_ms = 0, tokens = -1, queued = queued}
  if limits.max_queued > 0 and queued >= limits.max_queued then
    answer.refused, answer.retry_ms = 'key_queue', 1000
  elseif limits.rate > 0 then
    local bucket = redis.call('HMGET', S.tenant .. owner, 'tokens', 'refilled')
    local elapsed = math.max(0, now - tonumber(bucket[2] or now))
    answer.tokens = math.min(limits.burst, tonumber(bucket[1] or limits.burst) + elapsed * limits.rate / 1000)
    if answer.tokens < 1 then
      answer.refused, answer.retry_ms = 'key_rate', math.ceil((1 - answer.tokens) * 1000 / limits.rate)
    end
  end
  return answer
end
