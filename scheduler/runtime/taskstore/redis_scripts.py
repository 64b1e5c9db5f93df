"""The Lua scripts behind scheduler.runtime.taskstore.redis_store: every change that touches more
than one key runs as one script, so no replica ever sees half of it (a record without its queue
entry, a quota counted without its task, a result stored by a replica that lost its claim).

Each script takes ARGV[1] the key prefix (``{cluster}:``), ARGV[2] the consumer group, ARGV[3]
this replica's name, then its own arguments. Keys under the prefix:

    task:<id>                  hash: the task's record
    body:<id>, wav:<id>        strings: its request body, its WAV
    lease:<id>                 string: the replica that holds the task, with a TTL (the lease)
    idem:<tenant>:<key>        string: the task an Idempotency-Key made
    usage:<tenant>             hash: task id -> the bytes it keeps (body, then WAV): the quota
    finished:<tenant>          sorted set: finished task ids by finished_at: the sweep's order
    tenants                    set: tenants with stored tasks
    callbacks                  sorted set: task ids whose callback is being announced, by when
    queue                      stream: one entry per task to run; the group is the cluster's

A task is the caller's (``ours``) while its lease names this replica, or -- the lease lapsed
while Redis was unreachable and nobody else took the task -- while its queue entry is still
pending to this replica's consumer: then the lease is taken again. Another replica takes a task
over only by taking both (``take``), so the two never disagree for long.
"""

from __future__ import annotations

_PRELUDE = """
local P, GROUP, ME = ARGV[1], ARGV[2], ARGV[3]
local QUEUE = P .. 'queue'
local FINISHED = {succeeded = true, failed = true, expired = true, cancelled = true}
local function key(kind, id) return P .. kind .. ':' .. id end

local function owner(entry)
  if not entry then return nil end
  local pending = redis.call('XPENDING', QUEUE, GROUP, entry, entry, 1)
  if pending[1] then return pending[1][2] end
  return nil
end

local function ours(id, lease_ms)
  local lease = key('lease', id)
  local holder = redis.call('GET', lease)
  if holder then return holder == ME end
  local entry = redis.call('HGET', key('task', id), 'entry')
  if entry and owner(entry) == ME then
    redis.call('SET', lease, ME, 'PX', lease_ms)
    return true
  end
  return false
end

local function release(id, entry)
  if entry then
    redis.call('XACK', QUEUE, GROUP, entry)
    redis.call('XDEL', QUEUE, entry)
  end
  local lease = key('lease', id)
  if redis.call('GET', lease) == ME then redis.call('DEL', lease) end
end

-- Field/value pairs; an empty value removes the field (None).
local function set_fields(rec, fields)
  for i = 1, #fields, 2 do
    if fields[i + 1] == '' then redis.call('HDEL', rec, fields[i])
    else redis.call('HSET', rec, fields[i], fields[i + 1]) end
  end
end

-- An unfinished task's move to a final state: its body goes, its usage becomes its audio, it
-- joins the sweep's order, and its record and key live ttl_ms from now.
local function finish(id, now, ttl_ms, state, fields)
  local rec = key('task', id)
  local t = redis.call('HMGET', rec, 'tenant', 'idempotency_key', 'callback_url')
  local tenant, idem, callback = t[1], t[2], t[3]
  redis.call('HSET', rec, 'state', state, 'finished_at', now, 'updated_at', now, 'body_bytes', '0')
  set_fields(rec, fields)
  redis.call('DEL', key('body', id))
  redis.call('HSET', P .. 'usage:' .. tenant, id, redis.call('HGET', rec, 'audio_bytes') or '0')
  redis.call('ZADD', P .. 'finished:' .. tenant, now, id)
  redis.call('PEXPIRE', rec, ttl_ms)
  if idem then redis.call('PEXPIRE', P .. 'idem:' .. tenant .. ':' .. idem, ttl_ms) end
  if callback then redis.call('ZADD', P .. 'callbacks', now, id) end
end

local function remove(id)
  local rec = key('task', id)
  local t = redis.call('HMGET', rec, 'tenant', 'idempotency_key', 'entry')
  if not t[1] then return 0 end
  redis.call('DEL', rec, key('body', id), key('wav', id), key('lease', id))
  if t[2] then
    local idem = P .. 'idem:' .. t[1] .. ':' .. t[2]
    if redis.call('GET', idem) == id then redis.call('DEL', idem) end
  end
  redis.call('HDEL', P .. 'usage:' .. t[1], id)
  redis.call('ZREM', P .. 'finished:' .. t[1], id)
  redis.call('ZREM', P .. 'callbacks', id)
  if t[3] then
    redis.call('XACK', QUEUE, GROUP, t[3])
    redis.call('XDEL', QUEUE, t[3])
  end
  return 1
end

-- A delivered queue entry: take the task's lease, unless its holder is alive (then the entry goes
-- back to it); a task that is finished or gone leaves the queue.
local function take(id, entry, lease_ms, now)
  local rec = key('task', id)
  local lease = key('lease', id)
  local state = redis.call('HGET', rec, 'state')
  if not state or FINISHED[state] then
    release(id, entry)
    return {'gone'}
  end
  local holder = redis.call('GET', lease)
  if holder and holder ~= ME then
    redis.call('XCLAIM', QUEUE, GROUP, holder, 0, entry, 'JUSTID')
    return {'held', holder}
  end
  redis.call('SET', lease, ME, 'PX', lease_ms)
  if state == 'running' then  -- its holder died while a backend ran it: it runs again
    redis.call('HSET', rec, 'state', 'queued', 'updated_at', now)
    redis.call('HDEL', rec, 'started_at')
  end
  redis.call('HSET', rec, 'holder', ME, 'entry', entry)
  return {'taken', redis.call('HGETALL', rec)}
end
"""

# ARGV[4] id, [5] tenant, [6] Idempotency-Key or '', [7] body, [8] ms to live, [9] max tasks
# (0: no quota), [10] max bytes, [11..] the record's field/value pairs.
CREATE = _PRELUDE + """
local id, tenant, idem_key, body, live_ms = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local idem = nil
if idem_key ~= '' then
  idem = P .. 'idem:' .. tenant .. ':' .. idem_key
  local existing = redis.call('GET', idem)
  if existing then
    local found = redis.call('HGETALL', key('task', existing))
    if #found > 0 then return {'existing', found} end
  end
end
local usage = P .. 'usage:' .. tenant
local max_tasks, max_bytes = tonumber(ARGV[9]), tonumber(ARGV[10])
if max_tasks > 0 then
  local tasks, stored = redis.call('HLEN', usage), 0
  for _, v in ipairs(redis.call('HVALS', usage)) do stored = stored + tonumber(v) end
  local oldest = redis.call('ZRANGE', P .. 'finished:' .. tenant, 0, 0, 'WITHSCORES')
  local first = oldest[2] or ''
  if tasks + 1 > max_tasks then return {'quota', 'tasks', tostring(tasks), first} end
  if stored + #body > max_bytes then return {'quota', 'bytes', tostring(stored), first} end
end
local rec = key('task', id)
redis.call('HSET', rec, unpack(ARGV, 11))
redis.call('PEXPIRE', rec, live_ms)
redis.call('SET', key('body', id), body, 'PX', live_ms)
if idem then redis.call('SET', idem, id, 'PX', live_ms) end
redis.call('HSET', usage, id, #body)
redis.call('SADD', P .. 'tenants', tenant)
local entry = redis.call('XADD', QUEUE, '*', 'task', id)
redis.call('HSET', rec, 'entry', entry)
return {'created', entry}
"""

# ARGV[4] id, [5] entry, [6] lease ms, [7] now
TAKE = _PRELUDE + """
return take(ARGV[4], ARGV[5], ARGV[6], ARGV[7])
"""

# ARGV[4] min idle ms, [5] count, [6] lease ms, [7] now: {entry, record} of each task taken over.
RECLAIM = _PRELUDE + """
local claimed = redis.call('XAUTOCLAIM', QUEUE, GROUP, ME, ARGV[4], '0-0', 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(claimed[2]) do
  if type(e) == 'table' then
    local entry, fields, id = e[1], e[2], nil
    for i = 1, #fields, 2 do if fields[i] == 'task' then id = fields[i + 1] end end
    if id then
      local got = take(id, entry, ARGV[6], ARGV[7])
      if got[1] == 'taken' then table.insert(out, {entry, got[2]}) end
    else
      redis.call('XACK', QUEUE, GROUP, entry)
      redis.call('XDEL', QUEUE, entry)
    end
  end
end
return out
"""

# ARGV[4] lease ms, [5..] ids: per id its state when still ours (lease and entry renewed), 'lost'
# when another replica holds it, 'gone' when it no longer exists.
RENEW = _PRELUDE + """
local out = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local rec = key('task', id)
  local state = redis.call('HGET', rec, 'state')
  if not state then
    table.insert(out, 'gone')
  elseif ours(id, ARGV[4]) then
    redis.call('PEXPIRE', key('lease', id), ARGV[4])
    local entry = redis.call('HGET', rec, 'entry')
    if entry then redis.call('XCLAIM', QUEUE, GROUP, ME, 0, entry, 'JUSTID') end
    table.insert(out, state)
  else
    table.insert(out, 'lost')
  end
end
return out
"""

# ARGV[4] id, [5] now, [6] lease ms: QUEUED -> RUNNING for the task's holder; the record, or nil.
MARK_RUNNING = _PRELUDE + """
local id = ARGV[4]
local rec = key('task', id)
if redis.call('HGET', rec, 'state') ~= 'queued' or not ours(id, ARGV[6]) then return nil end
redis.call('HSET', rec, 'state', 'running', 'started_at', ARGV[5], 'updated_at', ARGV[5])
redis.call('HINCRBY', rec, 'attempts', 1)
return redis.call('HGETALL', rec)
"""

# ARGV[4] id, [5] now: RUNNING -> QUEUED.
REQUEUE = _PRELUDE + """
local rec = key('task', ARGV[4])
if redis.call('HGET', rec, 'state') ~= 'running' then return 0 end
redis.call('HSET', rec, 'state', 'queued', 'updated_at', ARGV[5])
redis.call('HDEL', rec, 'started_at')
return 1
"""

# ARGV[4] id, [5] now, [6] ttl ms, [7] lease ms, [8] final state, [9] WAV ('' unless succeeded),
# [10] '1': only the task's holder may finish it, [11..] field/value pairs. {outcome, record}:
# 'done'; 'finished' (it was already: nothing changed); 'lost' (another replica holds it); 'gone'.
FINISH = _PRELUDE + """
local id, now, ttl_ms, state, wav = ARGV[4], ARGV[5], ARGV[6], ARGV[8], ARGV[9]
local rec = key('task', id)
local current = redis.call('HGET', rec, 'state')
if not current then return {'gone'} end
local held = ARGV[10] == '1'
if held and not ours(id, ARGV[7]) then return {'lost'} end
local entry = redis.call('HGET', rec, 'entry')
if FINISHED[current] then
  if held then release(id, entry) end
  return {'finished', redis.call('HGETALL', rec)}
end
local fields = {}
for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
if state == 'succeeded' then
  redis.call('SET', key('wav', id), wav, 'PX', ttl_ms)
  fields[#fields + 1] = 'audio_bytes'
  fields[#fields + 1] = tostring(#wav)
end
finish(id, now, ttl_ms, state, fields)
if held then release(id, entry) end
return {'done', redis.call('HGETALL', rec)}
"""

# ARGV[4] id, [5] tenant, [6] now, [7] ttl ms: {'unknown'} or {'cancelled'|'unchanged', record}. A
# queue entry nobody holds leaves the queue now; a held one is left to its holder, which sees the
# cancel when it renews its lease.
CANCEL = _PRELUDE + """
local id = ARGV[4]
local rec = key('task', id)
local t = redis.call('HMGET', rec, 'tenant', 'state', 'entry')
if not t[1] or t[1] ~= ARGV[5] then return {'unknown'} end
if FINISHED[t[2]] then return {'unchanged', redis.call('HGETALL', rec)} end
finish(id, ARGV[6], ARGV[7], 'cancelled', {'reason', 'cancelled by client'})
if t[3] and not owner(t[3]) then redis.call('XDEL', QUEUE, t[3]) end
return {'cancelled', redis.call('HGETALL', rec)}
"""

# ARGV[4] id, [5] entry: the holder lets go of the task (its queue entry and lease).
RELEASE = _PRELUDE + """
release(ARGV[4], ARGV[5])
return 1
"""

# ARGV[4] id, [5] entry, [6] now: a queued task this replica will not run after all (it stops)
# goes back to the queue at once, as a new entry, instead of waiting for its lease to lapse.
HAND_BACK = _PRELUDE + """
local id = ARGV[4]
local rec = key('task', id)
if redis.call('HGET', rec, 'state') ~= 'queued' or not ours(id, 1000) then return 0 end
release(id, ARGV[5])
local entry = redis.call('XADD', QUEUE, '*', 'task', id)
redis.call('HSET', rec, 'entry', entry, 'updated_at', ARGV[6])
redis.call('HDEL', rec, 'holder')
return 1
"""

# ARGV[4] id
DELETE = _PRELUDE + """
return remove(ARGV[4])
"""

# ARGV[4] cutoff (finished before it: swept), [5] most per tenant. {swept, expired}: tasks swept,
# and tasks whose record had already expired (its TTL) and are no longer counted.
SWEEP = _PRELUDE + """
local swept, expired = 0, 0
for _, tenant in ipairs(redis.call('SMEMBERS', P .. 'tenants')) do
  local finished = P .. 'finished:' .. tenant
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', finished, '-inf', '(' .. ARGV[4], 'LIMIT', 0, ARGV[5])) do
    swept = swept + remove(id)
    redis.call('ZREM', finished, id)
  end
  local usage = P .. 'usage:' .. tenant
  for _, id in ipairs(redis.call('HKEYS', usage)) do
    if redis.call('EXISTS', key('task', id)) == 0 then
      redis.call('HDEL', usage, id)
      redis.call('ZREM', finished, id)
      redis.call('DEL', key('body', id), key('wav', id))
      expired = expired + 1
    end
  end
  if redis.call('HLEN', usage) == 0 then redis.call('SREM', P .. 'tenants', tenant) end
end
return {swept, expired}
"""

# ARGV[4] entry: how many undelivered queue entries are ahead of it, itself included (0: delivered).
POSITION = _PRELUDE + """
local last = '0-0'
for _, g in ipairs(redis.call('XINFO', 'GROUPS', QUEUE)) do
  local name, delivered = nil, nil
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then delivered = g[i + 1] end
  end
  if name == GROUP then last = delivered end
end
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local ems, eseq = parts(ARGV[4])
local lms, lseq = parts(last)
if ems < lms or (ems == lms and eseq <= lseq) then return 0 end
return #redis.call('XRANGE', QUEUE, '(' .. last, ARGV[4], 'COUNT', 100000)
"""

# ARGV[4] cutoff, [5] now, [6] most: callbacks whose announcement began before cutoff (its
# replica died, or never began), now this replica's to announce.
CALLBACKS_DUE = _PRELUDE + """
local ids = redis.call('ZRANGEBYSCORE', P .. 'callbacks', '-inf', ARGV[4], 'LIMIT', 0, ARGV[6])
for _, id in ipairs(ids) do redis.call('ZADD', P .. 'callbacks', ARGV[5], id) end
return ids
"""

# ARGV[4] id, [5] callback state, [6] now
SET_CALLBACK = _PRELUDE + """
local rec = key('task', ARGV[4])
if redis.call('EXISTS', rec) == 0 then
  redis.call('ZREM', P .. 'callbacks', ARGV[4])
  return 0
end
redis.call('HSET', rec, 'callback_state', ARGV[5])
if ARGV[5] == 'pending' then redis.call('ZADD', P .. 'callbacks', ARGV[6], ARGV[4])
else redis.call('ZREM', P .. 'callbacks', ARGV[4]) end
return 1
"""
