#!lua flags=allow-oom
-- One page of an owner's jobs, newest first, for GET /v1/jobs: ids only (the gateway loads each), with the
-- status each has now, so a filter on it needs no second look. Ids whose job has gone are dropped from the
-- owner's index on the way.
-- ARGV: 1 owner, 2 start below this creation time (ms; '+inf' for the newest), 3 at most this many ids,
--       4 only jobs of this status ('' for all), 5 look at most at this many, 6 S
-- Returns {creation time of the last one looked at, or '' when the index has no more; id, ...}
local S = cjson.decode(ARGV[6])
local index = S.jobs_of .. ARGV[1]
local bound = ARGV[2] == '+inf' and '+inf' or '(' .. ARGV[2]
local rows = redis.call('ZREVRANGEBYSCORE', index, bound, '-inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[5]))
local found, last = {}, ''
for i = 1, #rows, 2 do
  local id = rows[i]
  last = rows[i + 1]
  local meta = S.job .. id
  local status = redis.call('HGET', meta, 'status')
  if not status then
    if redis.call('EXISTS', meta) == 0 then
      status = 'gone'
      redis.call('ZREM', index, id)
    elseif redis.call('EXISTS', S.in_progress .. id) == 1 then
      status = 'running'
    elseif redis.call('ZSCORE', S.queue, id) or redis.call('ZSCORE', S.waiting .. ARGV[1], id) then
      status = 'queued'
    else
      status = 'failed'
    end
  end
  if status ~= 'gone' and (ARGV[4] == '' or status == ARGV[4]) then
    table.insert(found, id)
    if #found == tonumber(ARGV[3]) then return {last, unpack(found)} end
  end
end
if #rows < 2 * tonumber(ARGV[5]) then last = '' end
return {last, unpack(found)}
