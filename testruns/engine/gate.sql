-- The gate's SQL, one named query each, read by testruns/engine/gate.py at import.
-- {placeholders} are fragments gate.py fills in; %(name)s / %s are parameters.

-- name: ensure_semaphore
-- Create a semaphore row with its first limit, unless it exists.
INSERT INTO testruns_semaphore (name, "limit", in_use, corrections, updated_at)
VALUES (%s, %s, 0, 0, now()) ON CONFLICT (name) DO NOTHING

-- name: recreate_provider_semaphore
-- A provider's semaphore deleted while idle comes back with the provider's max_concurrency.
INSERT INTO testruns_semaphore (name, "limit", in_use, corrections, updated_at)
SELECT %s, max_concurrency, 0, 0, now() FROM testruns_provider WHERE id = %s
ON CONFLICT (name) DO NOTHING

-- name: set_limit
-- Change a limit and nothing else (in_use and the AIMD ceiling are the gate's).
UPDATE testruns_semaphore SET "limit" = %s, updated_at = now() WHERE name = %s

-- name: lock
-- Lock a semaphore row; (id, limit, in_use, effective_limit).
SELECT id, "limit", in_use, effective_limit FROM testruns_semaphore WHERE name = %s FOR UPDATE

-- name: admit_runs
-- With "runs" locked: pick up to %(free)s queued runs in queue order, skipping runs whose
-- launcher is at the per-user limit; mark them running, lease their slots, count them. The
-- statement is the server-side function pcr_admit_runs (migration 0007).
SELECT run_id, provider_id FROM pcr_admit_runs(%(sem)s, %(free)s, %(per_user)s)

-- name: finish_run
-- Close a running run whose cases are all done, give back its slot and promote the next
-- runs (pcr_finish_run, migration 0007): (final status or NULL, promoted runs as jsonb).
SELECT finished, promoted FROM pcr_finish_run(%(run)s, %(runs)s, %(per_user)s)

-- name: delete_leases
-- Delete the leases matching {where} and lower in_use by as many, per semaphore.
WITH gone AS (DELETE FROM testruns_lease WHERE {where} RETURNING semaphore_id)
UPDATE testruns_semaphore s SET in_use = s.in_use - g.n
FROM (SELECT semaphore_id, count(*) AS n FROM gone GROUP BY semaphore_id) g
WHERE s.id = g.semaphore_id

-- name: admit_cases
-- With "provider:<id>" locked: per running run (priority desc, queued_at), take its first
-- pending cases up to its own room, up to the provider's free slots; mark them running,
-- lease them (the first one to the keeper, when given) and count them. The statement is the
-- server-side function pcr_admit_cases (migration 0007), which pcr_close_case also calls.
SELECT result_id, lease_id, holder, run_id
FROM pcr_admit_cases(%(sem)s, %(provider)s, %(free)s, %(ttl)s, %(keeper)s)

-- name: close_case
-- A finished case in one round trip: give back its slot (the fence), write its outcome
-- exactly once, count it in the run's totals, finish the run if that was its last case, and
-- promote the next cases: pcr_close_case (migration 0007).
SELECT held, written, complete, event_due, admitted, finished, promoted FROM pcr_close_case(
    %(lease)s, %(result)s, %(run)s, %(provider)s, %(status)s, %(fields)s::jsonb,
    %(succeeded)s, %(skip_rest)s, %(keeper)s, %(ttl)s, %(event_interval)s, %(runs)s,
    %(per_user)s)

-- name: claim_case
-- Take over an admitted case's unclaimed, unexpired lease for this worker.
UPDATE testruns_lease SET holder = %s, expires_at = now() + make_interval(secs => %s)
WHERE result_id = %s AND holder = '' AND expires_at > now() RETURNING id

-- name: release_case
-- One round trip: delete the lease, give its slot back ({grow}: the AIMD ceiling after a
-- success), and return the row as it now is and whether there was a lease to delete.
WITH gone AS (DELETE FROM testruns_lease WHERE id = %(lease)s RETURNING semaphore_id)
UPDATE testruns_semaphore s SET in_use = s.in_use - (SELECT count(*) FROM gone){grow}
WHERE s.name = %(name)s
RETURNING s.id, s."limit", s.in_use, s.effective_limit, (SELECT count(*) FROM gone)

-- name: grow_ceiling
-- After a successful call: the AIMD ceiling grows back towards the limit (additive increase),
-- and is lifted (NULL) once it reaches it. A fragment of release_case.
, effective_limit = CASE WHEN s.effective_limit + 1.0 / s.effective_limit >= s."limit"
    THEN NULL ELSE s.effective_limit + 1.0 / s.effective_limit END

-- name: throttle_provider
-- Halve the provider's ceiling unless it was halved after the throttled request went out.
UPDATE testruns_semaphore SET effective_limit =
    GREATEST(1, COALESCE(effective_limit, "limit") / 2), throttled_at = statement_timestamp()
WHERE name = %s AND (throttled_at IS NULL OR
      throttled_at <= statement_timestamp() - make_interval(secs => %s))
RETURNING id

-- name: heartbeat
-- Extend the leases this worker process is working on.
UPDATE testruns_lease SET expires_at = now() + make_interval(secs => %s)
WHERE holder = %s AND id = ANY(%s)

-- name: providers_holding
-- The providers whose case leases match {condition}.
SELECT DISTINCT r.provider_id FROM testruns_lease l JOIN testruns_testrun r ON r.id = l.run_id
WHERE l.result_id IS NOT NULL AND {condition}

-- name: leased_results
-- With the provider locked: the results whose leases on it match {condition}.
SELECT l.result_id FROM testruns_lease l
WHERE l.semaphore_id = %s AND l.result_id IS NOT NULL AND {condition}

-- name: results_to_pending
-- Cases whose lease was taken back wait again.
UPDATE testruns_testresult SET status = 'pending' WHERE id = ANY(%s) AND status = 'running'

-- name: drifted
-- Semaphores whose in_use differs from their lease rows (one snapshot: no false alarms).
SELECT s.name FROM testruns_semaphore s
LEFT JOIN (SELECT semaphore_id, count(*) AS n FROM testruns_lease GROUP BY semaphore_id) c
       ON c.semaphore_id = s.id
WHERE s.in_use <> COALESCE(c.n, 0) ORDER BY s.name

-- name: recount
-- With the semaphore locked: set in_use to its lease count, counting the correction.
WITH counted AS (
    SELECT s.id, s.in_use AS was,
           (SELECT count(*) FROM testruns_lease l WHERE l.semaphore_id = s.id) AS n
    FROM testruns_semaphore s WHERE s.name = %s
)
UPDATE testruns_semaphore s SET in_use = counted.n, corrections = s.corrections + 1
FROM counted WHERE s.id = counted.id AND counted.was <> counted.n
RETURNING s.name, counted.was, counted.n
