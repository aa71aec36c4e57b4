"""The cluster's atomic steps, each one Lua script run by Redis (``EVALSHA``).

Every step that reads and then writes, or writes several keys that must agree, is a
script here, so no two processes can interleave inside it. Key names come from
``keys.py``: the scripts receive the fixed prefixes they need as arguments and never
spell a name of their own. Only commands of Redis 7.0 are used (no ``XACKDEL``, no
``XREADGROUP … CLAIM``), and each script is safe to run again (a redelivered entry,
a retried call after a failover).

- :data:`REGISTER` — a new task record, or what is known of an existing one (a
  conflict, or a retry the caller may attach to); :data:`FORGET` drops a finished one.
- :data:`ENQUEUE` — global backpressure check, then the task's queue entry; if a worker
  is idle, the entry is taken for it and begun at once, and pushed to its inbox (no
  pull round trip), else the workers are hinted.
- :data:`PULL` — a worker takes entries by capacity: first from the shapes it runs,
  then, when it may take a new shape, from the one whose oldest entry waited longest.
  It says whether entries are still waiting, and registers an idle worker as such.
- :data:`START` — a worker begins a task: counts the delivery (a crash counts), and
  says whether it is still to run, already done, or poisoned (past the limit).
- :data:`REFRESH` — a worker's heartbeat on the entries it still owns (idle time reset
  without counting a delivery); returns them, so it learns what was taken away.
  :data:`ORPHANS` takes over the entries of workers whose liveness key has expired.
- :data:`FINISH` — exactly once: only the first terminal outcome of a task wins; it is
  recorded, its entry acknowledged and deleted, its frame appended to its session's
  outbox and handed to the owning gateway (its delivery list), its webhook queued, the
  gateway that queued it told (by that notice when it went to it, else a message).
- :data:`PROGRESS`, :data:`OPEN`, :data:`TAKE`, :data:`DETACH`, :data:`KEEP` — progress
  and the session's outbox: open or resume, hand out frames no gateway took yet (once),
  let go, give a frame back.
- :data:`IMAGES_DUE` — images in S3 whose time is up, taken off the expiry index (each
  by one process, which deletes them).
"""

from __future__ import annotations

NAMES = (
    "REGISTER",
    "FORGET",
    "ENQUEUE",
    "PULL",
    "START",
    "REFRESH",
    "ORPHANS",
    "FINISH",
    "PROGRESS",
    "OPEN",
    "TAKE",
    "DETACH",
    "KEEP",
    "IMAGES_DUE",
)

# Shared Lua: the notice of a frame in its owning gateway's delivery list (one string:
# TAKE rebuilds it from the outbox entry, to take it back with LREM).
_NOTICE = """
local function notice(sid, id, is_error, origin, task_uuid, frame)
  return sid .. '\\n' .. id .. '\\n' .. is_error .. '\\n' .. origin .. '\\n' .. task_uuid .. '\\n' .. frame
end
"""

# Shared Lua: append a frame to session SID's outbox if the session still exists, keep
# the outbox as long as the session, and hand the frame to its owning gateway: a notice
# pushed on that gateway's delivery list, on which it blocks (BLMPOP). Popping is the
# hand-over, atomic in Redis: a notice is delivered by the gateway that popped it, or
# taken back by a TAKE (a resume elsewhere) before anyone did, never both. The entry
# records to whom it went ('g'); not to ``not_to`` (a gateway giving a frame back).
# Returns the gateway the notice went to (nil: none). ``is_error`` is '1' for an error
# frame, 'p' for a progress frame, '0' for any other: a notice of a task's frame that is
# not 'p' tells the gateway popping it that the task has finished.
_APPEND = (
    _NOTICE
    + """
local function append(sess_prefix, out_prefix, suffix, deliver_prefix, sid, frame, is_error, origin, task_uuid,
                      maxlen, not_to)
  local sk = sess_prefix .. sid .. suffix
  local owner = redis.call('HGET', sk, 'owner')
  if owner == false then return end  -- expired: nobody can resume it (the record keeps the answer)
  if owner == not_to then owner = '' end
  local ok = out_prefix .. sid .. suffix
  local id = redis.call('XADD', ok, 'MAXLEN', '~', maxlen, '*', 'f', frame, 'e', is_error, 'o', origin,
    't', task_uuid, 'g', owner)
  local ttl = redis.call('PTTL', sk)
  if ttl > 0 then redis.call('PEXPIRE', ok, ttl) end
  if owner ~= '' then
    local dk = deliver_prefix .. owner .. suffix
    redis.call('RPUSH', dk, notice(sid, id, is_error, origin, task_uuid, frame))
    if ttl > 0 then redis.call('PEXPIRE', dk, ttl) end
    return owner
  end
end
"""
)

# Shared Lua: a worker begins a task (the START step, inlined where entries are taken).
# The delivery is counted first, so a worker that dies on it has used one up. Returns
# {verdict, context, session id, async, taskType, runs, input media type, input bytes};
# verdict is run, poison (past max deliveries), done (answered already: drop the entry)
# or gone (no record: Redis lost it). The input image comes along (one round trip), when
# images are in Redis (image_prefix '' when they are in S3: the worker reads it there)
# and it is at most INLINE_IMAGE_BYTES: a larger one comes as its media type alone, and
# the worker reads it with HMGET. (Bytes copied through a script cost Redis about 2 us
# per KB, twice: a 400 KB input made ENQUEUE on an idle worker take 1 ms instead of 0.1.)
INLINE_IMAGE_BYTES = 64 * 1024

_BEGIN = (
    f"local INLINE_IMAGE_BYTES = {INLINE_IMAGE_BYTES}\n"
    + """
local function begin(task_key, max_deliveries, worker, image_prefix, suffix)
  local f = redis.call('HMGET', task_key, 'status', 'ctx', 'sid', 'async', 'type', 'in')
  if not f[1] then return {'gone'} end
  if f[1] ~= 'processing' then return {'done'} end
  local runs = redis.call('HINCRBY', task_key, 'runs', 1)
  redis.call('HSET', task_key, 'worker', worker)
  local verdict = 'run'
  if runs > tonumber(max_deliveries) then verdict = 'poison' end
  local media, data = '', ''
  if verdict == 'run' and image_prefix ~= '' then  -- '': not in Redis
    local input = f[6]
    if not input or input == '' then  -- queued by an older gateway: named in the context only
      local ok, ctx = pcall(cjson.decode, f[2] or '')
      input = ok and ctx['input'] or nil
    end
    if input then
      local image_key = image_prefix .. input .. suffix
      if redis.call('HSTRLEN', image_key, 'd') <= INLINE_IMAGE_BYTES then
        local image = redis.call('HMGET', image_key, 't', 'd')
        media, data = image[1] or '', image[2] or ''
      else
        media = redis.call('HGET', image_key, 't') or ''
      end
    end
  end
  return {verdict, f[2] or '', f[3] or '', f[4] or '0', f[5] or '', tostring(runs), media, data}
end
"""
)

# Shared Lua: the time (ms) of the oldest entry of a queue not yet delivered to any
# worker, or nil when there is none.
_WAITING = """
local function waiting_since(queue_key)
  local groups = redis.pcall('XINFO', 'GROUPS', queue_key)
  if type(groups) ~= 'table' then return nil end
  for _, group in ipairs(groups) do
    local info = {}
    for j = 1, #group, 2 do info[group[j]] = group[j + 1] end
    if info['name'] == 'workers' then
      local first = redis.call('XRANGE', queue_key, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
      if first[1] then return tonumber(string.match(first[1][1], '^(%d+)')) end
    end
  end
  return nil
end
"""

# Shared Lua: read the oldest entry of a queue not yet delivered, for a consumer (it is
# then pending under it), and begin its task (see _BEGIN). Returns {entry id, task uuid,
# rows, begin's answer}, or nil when no entry waits.
_TAKE_ONE = (
    _BEGIN
    + """
local function take_one(queue_key, consumer, task_prefix, suffix, max_deliveries, image_prefix)
  local r = redis.pcall('XREADGROUP', 'GROUP', 'workers', consumer, 'COUNT', 1, 'STREAMS', queue_key, '>')
  if type(r) ~= 'table' or not r[1] or not r[1][2][1] then return nil end
  local entry = r[1][2][1]
  local fields = {}
  for j = 1, #entry[2], 2 do fields[entry[2][j]] = entry[2][j + 1] end
  local task_uuid = fields['t'] or ''
  local began = begin(task_prefix .. task_uuid .. suffix, max_deliveries, consumer, image_prefix, suffix)
  return {entry[1], task_uuid, fields['r'] or '1', began}
end
"""
)

# KEYS: task. ARGV: key hash, session id, async (1/0), taskType, TTL ms, gateway id,
# origin peer id, content fingerprint, admission nonce ('' for none: see ENQUEUE).
REGISTER = """
local known = redis.call('HMGET', KEYS[1], 'key', 'fp', 'status', 'async')
if known[1] then return {1, known[1], known[2] or '', known[3] or '', known[4] or ''} end
redis.call('HSET', KEYS[1], 'key', ARGV[1], 'sid', ARGV[2], 'async', ARGV[3], 'type', ARGV[4],
  'status', 'processing', 'progress', '0', 'gw', ARGV[6], 'origin', ARGV[7], 'fp', ARGV[8], 'runs', '0',
  'adm', ARGV[9])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {0}
"""

# KEYS: task. Deletes a finished record (a REST retry may run its taskUUID again).
FORGET = """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'processing' then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: task, shapes set, the shape's queue, idle workers (zset). ARGV: max queued (0:
# no bound), shape, task uuid, rows, context, queue prefix, suffix, max deliveries,
# image prefix ('' when images are not in Redis), inbox prefix, liveness key prefix,
# work channel, task prefix, admission nonce, input image uuid.
# Returns the entry id ('pushed:' before it when an idle worker took it), 'full', 'lost'
# or 'conflict'. With a nonce, the ENQUEUE rides in one pipeline with its REGISTER (one
# round trip for the admission): it queues only if that very REGISTER created the
# record (a conflicting taskUUID's record holds another nonce, or none).
# An idle worker (one whose last PULL found nothing and holds nothing) takes the entry
# here: read for it from its group (so it is pending under it, as if it had pulled it),
# begun, and written with begin's answer to its inbox stream, on which it blocks. Idle
# workers whose liveness key has expired are dropped on the way.
ENQUEUE = (
    _TAKE_ONE
    + """
local nonce = redis.call('HGET', KEYS[1], 'adm')
if nonce == false then return 'lost' end
if ARGV[14] ~= '' and nonce ~= ARGV[14] then return 'conflict' end
local max = tonumber(ARGV[1])
if max > 0 then
  local total = 0
  for _, shape in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    total = total + redis.call('XLEN', ARGV[6] .. shape .. ARGV[7])
  end
  if total >= max then return 'full' end
end
if redis.call('SADD', KEYS[2], ARGV[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 0 then
  redis.pcall('XGROUP', 'CREATE', KEYS[3], 'workers', '0', 'MKSTREAM')
end
local id = redis.call('XADD', KEYS[3], '*', 't', ARGV[3], 'r', ARGV[4])
redis.call('HSET', KEYS[1], 'ctx', ARGV[5], 'entry', id, 'shape', ARGV[2], 'in', ARGV[15])
while true do
  local idle = redis.call('ZPOPMIN', KEYS[4])
  if not idle[1] then break end
  local worker = idle[1]
  if redis.call('EXISTS', ARGV[11] .. worker) == 1 then
    local t = take_one(KEYS[3], worker, ARGV[13], ARGV[7], ARGV[8], ARGV[9])
    if not t then break end
    local b = t[4]
    redis.call('XADD', ARGV[10] .. worker .. ARGV[7], 'MAXLEN', '~', 256, '*', 's', ARGV[2], 'e', t[1],
      't', t[2], 'r', t[3], 'v', b[1], 'c', b[2] or '', 'i', b[3] or '', 'a', b[4] or '0',
      'y', b[5] or '', 'n', b[6] or '0', 'm', b[7] or '', 'd', b[8] or '')
    return 'pushed:' .. id
  end
end
redis.call('PUBLISH', ARGV[12], '')
return id
"""
)

# KEYS: shapes set, idle workers (zset), the worker's inbox. ARGV: consumer, rows to
# take from a new shape (0: none), how long (ms) the oldest entry of a new shape must
# have waited (0: any), queue prefix, suffix, max deliveries, task prefix, image prefix,
# whether the worker holds nothing (1/0), the last inbox entry it read (it and those
# before it are trimmed: they carry input images), then pairs
# (shape, free rows) of the shapes the worker runs. Entries are taken one at a time
# until their rows fill the free rows (a two-row entry may exceed them by one), and each
# is begun at once (see _BEGIN).
# Returns {more, taken}: more is 1 when entries are still waiting in some queue after
# this pull (the worker pulls again when rows free up), taken a list of {shape, entry
# id, task uuid, rows, begin's answer...}. A worker that holds nothing, took nothing and
# has nothing unread in its inbox is registered idle (ENQUEUE then pushes to it);
# otherwise it is not.
PULL = (
    _TAKE_ONE
    + _WAITING
    + """
local out = {}
local held = {}
local function read(shape, free)
  local taken = 0
  while taken < free do
    local t = take_one(ARGV[4] .. shape .. ARGV[5], ARGV[1], ARGV[7], ARGV[5], ARGV[6], ARGV[8])
    if not t then return end
    taken = taken + tonumber(t[3])
    table.insert(out, {shape, t[1], t[2], t[3], unpack(t[4])})
  end
end
for i = 11, #ARGV, 2 do
  held[ARGV[i]] = true
  read(ARGV[i], tonumber(ARGV[i + 1]))
end
-- Each other shape's oldest waiting entry, looked at once: which new shape to take, and
-- whether entries wait after this pull.
local waiting = {}
local best, best_ms = nil, nil
for _, shape in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if not held[shape] then
    local ms = waiting_since(ARGV[4] .. shape .. ARGV[5])
    if ms then
      waiting[shape] = true
      if best_ms == nil or ms < best_ms then best, best_ms = shape, ms end
    end
  end
end
if tonumber(ARGV[2]) > 0 and best ~= nil then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if tonumber(ARGV[3]) == 0 or now_ms - best_ms >= tonumber(ARGV[3]) then
    read(best, tonumber(ARGV[2]))
    waiting[best] = waiting_since(ARGV[4] .. best .. ARGV[5]) ~= nil
  end
end
local more = 0
for _, yes in pairs(waiting) do
  if yes then more = 1 end
end
for i = 11, #ARGV, 2 do  -- the shapes it runs: entries may be left that did not fit
  if more == 0 and waiting_since(ARGV[4] .. ARGV[i] .. ARGV[5]) then more = 1 end
end
-- The inbox entries it has read carry input images: they go now, not in a round trip
-- of their own when read (XTRIM drops the ids below the one after the last read).
local ms, seq = string.match(ARGV[10], '^(%d+)-(%d+)$')
if ms and ARGV[10] ~= '0-0' then
  redis.call('XTRIM', KEYS[3], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
end
local unread = redis.call('XRANGE', KEYS[3], '(' .. ARGV[10], '+', 'COUNT', 1)
if ARGV[9] == '1' and #out == 0 and #unread == 0 then
  local now = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return {more, out}
"""
)

# KEYS: tasks. ARGV: max deliveries, worker id, image prefix, suffix.
# Begins each task (entries a worker took over with XAUTOCLAIM); begin's answer for each.
START = (
    _BEGIN
    + """
local out = {}
for _, key in ipairs(KEYS) do table.insert(out, begin(key, ARGV[1], ARGV[2], ARGV[3], ARGV[4])) end
return out
"""
)

# KEYS: queues the worker holds entries of. ARGV: consumer, group.
REFRESH = """
local mine = {}
for _, key in ipairs(KEYS) do
  local pending = redis.pcall('XPENDING', key, ARGV[2], '-', '+', 1000, ARGV[1])
  if type(pending) == 'table' and #pending > 0 then
    local ids = {}
    for _, p in ipairs(pending) do table.insert(ids, p[1]) end
    redis.call('XCLAIM', key, ARGV[2], ARGV[1], 0, unpack(ids))
    for _, id in ipairs(ids) do table.insert(mine, id) end
  end
end
return mine
"""

# KEYS: a queue. ARGV: group, this consumer, liveness key prefix, count.
# Claims (for this consumer) up to ``count`` entries held by consumers whose liveness key
# has expired (silent for the claim timeout: dead or stalled), whatever the entries' own
# idle time: an entry taken just before its worker's last heartbeat need not wait a whole
# claim timeout more. Returns a flat list: entry id, task uuid, rows, entry id, ...
ORPHANS = """
local out = {}
local want = tonumber(ARGV[4])
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(consumers) ~= 'table' then return out end
for _, consumer in ipairs(consumers) do
  local info = {}
  for j = 1, #consumer, 2 do info[consumer[j]] = consumer[j + 1] end
  if want > 0 and info['pending'] > 0 and info['name'] ~= ARGV[2]
      and redis.call('EXISTS', ARGV[3] .. info['name']) == 0 then
    local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', want, info['name'])
    local ids = {}
    for _, p in ipairs(pending) do table.insert(ids, p[1]) end
    if #ids > 0 then
      for _, entry in ipairs(redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ids))) do
        local fields = {}
        for j = 1, #entry[2], 2 do fields[entry[2][j]] = entry[2][j + 1] end
        table.insert(out, entry[1]); table.insert(out, fields['t'] or ''); table.insert(out, fields['r'] or '1')
        want = want - 1
      end
    end
  end
end
return out
"""

# KEYS: task, webhook stream. ARGV: status (success|error), result JSON, frame ('' for
# none), frame is an error (1/0), webhook URL ('' for none), webhook body, record TTL ms,
# outbox max length, session prefix, outbox prefix, queue prefix, suffix, gateway
# channel prefix, task uuid, delivery list prefix.
# Returns 1 (this outcome won), 0 (the task had finished already), -1 (no record).
FINISH = (
    _APPEND
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'sid', 'gw', 'entry', 'shape', 'origin')
if not f[1] then return -1 end
if f[1] ~= 'processing' then return 0 end
if ARGV[1] == 'success' then
  redis.call('HSET', KEYS[1], 'status', 'success', 'item', ARGV[2], 'progress', '100')
else
  redis.call('HSET', KEYS[1], 'status', 'error', 'error', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if f[4] and f[5] then
  local q = ARGV[11] .. f[5] .. ARGV[12]
  redis.call('XACK', q, 'workers', f[4])
  redis.call('XDEL', q, f[4])
end
local to = nil
if ARGV[3] ~= '' and f[2] then
  to = append(ARGV[9], ARGV[10], ARGV[12], ARGV[15], f[2], ARGV[3], ARGV[4], f[6] or '', ARGV[14], ARGV[8], '')
end
if ARGV[5] ~= '' then redis.call('XADD', KEYS[2], '*', 'u', ARGV[5], 'b', ARGV[6], 't', ARGV[14]) end
-- The gateway that queued it learns it is done: from the frame's notice when that went to
-- it (one message fewer per task), else by a message on its channel.
if f[3] and f[3] ~= to then redis.call('PUBLISH', ARGV[13] .. f[3], 'd ' .. ARGV[14]) end
return 1
"""
)

# KEYS: task. ARGV: percent, frame ('' if not live), outbox max length, session prefix,
# outbox prefix, suffix, delivery list prefix, task uuid.
PROGRESS = (
    _APPEND
    + """
local f = redis.call('HMGET', KEYS[1], 'status', 'sid')
if f[1] ~= 'processing' then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
if ARGV[2] ~= '' and f[2] then
  append(ARGV[4], ARGV[5], ARGV[6], ARGV[7], f[2], ARGV[2], 'p', '', ARGV[8], ARGV[3], '')
end
return 1
"""
)

# KEYS: session, outbox. ARGV: key hash, gateway id, TTL ms, mode: resume (only if it
# exists and is this key's), create, or ensure (create if absent, else take ownership:
# after Redis restarted empty, a gateway puts back the sessions it serves).
OPEN = """
local key = redis.call('HGET', KEYS[1], 'key')
if ARGV[4] == 'resume' or (ARGV[4] == 'ensure' and key) then
  if key ~= ARGV[1] then return 0 end
  redis.call('HSET', KEYS[1], 'owner', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'key', ARGV[1], 'owner', ARGV[2], 'last', '0-0')
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
return 1
"""

# KEYS: session, outbox. ARGV: gateway id, count, delivery list prefix, suffix, session id.
# Returns {1, entries} and moves the session's cursor past what it looked at, so each
# frame is handed out once; {0} if another gateway owns the session; {-1} if it is gone.
# Of the frames handed to a gateway (see _APPEND): one whose notice was popped already
# is not returned (that gateway delivers it); one whose notice still waits on another
# gateway's list is taken back and returned; one still waiting on this gateway's own
# list stops the take there (its delivery loop sends it, in order).
TAKE = (
    _NOTICE
    + """
local s = redis.call('HMGET', KEYS[1], 'owner', 'last')
if not s[1] then return {-1} end
if s[1] ~= ARGV[1] then return {0} end
local entries = redis.call('XRANGE', KEYS[2], '(' .. (s[2] or '0-0'), '+', 'COUNT', ARGV[2])
local out = {}
local last = nil
for _, entry in ipairs(entries) do
  local f = {}
  for j = 1, #entry[2], 2 do f[entry[2][j]] = entry[2][j + 1] end
  local to = f['g'] or ''
  if to == '' then
    table.insert(out, entry)
  else
    local waiting = notice(ARGV[5], entry[1], f['e'] or '0', f['o'] or '', f['t'] or '', f['f'] or '')
    local list = ARGV[3] .. to .. ARGV[4]
    if to == ARGV[1] then
      if redis.call('LPOS', list, waiting) then break end
    elseif redis.call('LREM', list, 1, waiting) == 1 then
      table.insert(out, entry)
    end
  end
  last = entry[1]
end
if last then redis.call('HSET', KEYS[1], 'last', last) end
return {1, out}
"""
)

# KEYS: session, outbox. ARGV: gateway id, TTL ms.
DETACH = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', '')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS: (none). ARGV: session prefix, outbox prefix, suffix, delivery list prefix,
# session id, frame, is error, origin, task uuid, outbox max length, the gateway giving
# the frame back (not handed to it again: the next TAKE or resume gets it).
KEEP = (
    _APPEND
    + """
append(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
return 1
"""
)

# KEYS: the image expiry index. ARGV: now (seconds), count.
# Returns {uuid, expiry, ...} of up to count images due by now, removed from the index.
IMAGES_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 1, #due, 2 do redis.call('ZREM', KEYS[1], due[i]) end
return due
"""
