-- Shared by every step (the store puts it before each script): queue a job's webhook delivery, atomically
-- with the change of state that causes it. Key names as in store.py.

-- The job's delivery of `event` ('start' or 'completed'), if it asked for one: a durable unit of work
-- (segserve:delivery:<id>, due in segserve:deliveries) holding a snapshot of the job at this moment.
local function queue_delivery(meta_key, job_id, event, now)
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
  local key = 'segserve:delivery:' .. id
  redis.call('HSET', key, 'job_id', job_id, 'type', kind, 'url', url, 'owner', redis.call('HGET', meta_key, 'owner'),
    'snapshot', cjson.encode(redis.call('HGETALL', meta_key)), 'created', now, 'attempts', 0, 'state', 'pending')
  redis.call('PEXPIRE', key, 8 * 24 * 3600 * 1000)  -- past any retry window; record.lua shortens it at the end
  redis.call('ZADD', 'segserve:deliveries', now, id)
  summary[kind] = {id = id, state = 'pending', attempts = 0, last_status = cjson.null}
  redis.call('HSET', meta_key, 'deliveries', cjson.encode(summary))
end
