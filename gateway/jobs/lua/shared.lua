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

-- Why a job cannot be queued now, or nil: the queue holds max_queued jobs; the inputs of jobs not yet ended
-- would pass max_bytes (a lone job is always let in, however large); or Redis nears its maxmemory, where the
-- later steps of the jobs it holds must still find room.
local function refusal(queue, stats, max_queued, bytes, max_bytes, memory_fraction)
  if redis.call('ZCARD', queue) >= tonumber(max_queued) then return 'queue' end
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
