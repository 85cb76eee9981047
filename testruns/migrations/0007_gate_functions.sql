-- The gate's hot path as server-side functions (issue 10), installed by migration 0007.
-- Frozen with that migration: a later change is a new migration with CREATE OR REPLACE.
--
-- PL/pgSQL, not one statement with CTEs: under READ COMMITTED every statement of a VOLATILE
-- function takes a fresh snapshot, so the statements after the one that locks the semaphore
-- row see everything the previous holder of the lock committed (the gate's rule "lock first,
-- in its own statement", kept inside one round trip).

-- With the provider's semaphore row locked by the caller: per running run (priority desc,
-- queued_at), take its first pending cases up to its own room (max_concurrent_tests minus its
-- cases in flight), up to `free`; mark them running, lease them (the first one to `keeper`,
-- when given) and count them. Returns what it admitted, with each case's run.
CREATE OR REPLACE FUNCTION pcr_admit_cases(
    p_sem bigint, p_provider bigint, p_free integer, p_ttl double precision, p_keeper text
) RETURNS TABLE (result_id bigint, lease_id bigint, holder text, run_id bigint)
LANGUAGE sql VOLATILE AS $$
    WITH runs AS (
        SELECT r.id, r.priority, r.queued_at, r.max_concurrent_tests -
               (SELECT count(*) FROM testruns_lease l
                WHERE l.run_id = r.id AND l.semaphore_id = p_sem) AS room
        FROM testruns_testrun r
        WHERE r.provider_id = p_provider AND r.status = 'running' AND NOT r.cancel_requested
    ), chosen AS (
        SELECT c.id FROM runs
        CROSS JOIN LATERAL (
            SELECT t.id, t.position FROM testruns_testresult t
            WHERE t.run_id = runs.id AND t.status = 'pending'
            ORDER BY t.position LIMIT GREATEST(runs.room, 0)
        ) c
        ORDER BY runs.priority DESC, runs.queued_at, runs.id, c.position
        LIMIT GREATEST(p_free, 0)
    ), promoted AS (
        UPDATE testruns_testresult t SET status = 'running', dispatched_at = NULL
        FROM chosen WHERE t.id = chosen.id AND t.status = 'pending'
        RETURNING t.id, t.run_id
    ), leased AS (
        INSERT INTO testruns_lease (semaphore_id, holder, run_id, result_id, acquired_at,
                                    expires_at)
        SELECT p_sem, CASE WHEN row_number() OVER (ORDER BY id) = 1 THEN p_keeper ELSE '' END,
               run_id, id, now(), now() + make_interval(secs => p_ttl)
        FROM promoted
        RETURNING testruns_lease.result_id, testruns_lease.id, testruns_lease.holder,
                  testruns_lease.run_id
    ), counted AS (
        UPDATE testruns_semaphore SET in_use = in_use + (SELECT count(*) FROM leased)
        WHERE id = p_sem
    )
    SELECT leased.result_id, leased.id, leased.holder, leased.run_id FROM leased
$$;

-- With the "runs" semaphore row locked by the caller (its id `p_sem`): pick up to `p_free`
-- queued runs in queue order, skipping runs whose launcher is at the per-user limit (the row
-- named `p_per_user`); mark them running, lease their slots, count them.
CREATE OR REPLACE FUNCTION pcr_admit_runs(p_sem bigint, p_free integer, p_per_user text)
RETURNS TABLE (run_id bigint, provider_id bigint)
LANGUAGE sql VOLATILE AS $$
    WITH user_limit AS (
        SELECT COALESCE((SELECT "limit" FROM testruns_semaphore WHERE name = p_per_user), 0) AS n
    ), running_per_user AS (
        SELECT r.launched_by_id AS user_id, count(*) AS n
        FROM testruns_lease l JOIN testruns_testrun r ON r.id = l.run_id
        WHERE l.semaphore_id = p_sem AND l.result_id IS NULL
        GROUP BY r.launched_by_id
    ), queue AS (
        SELECT r.id, r.priority, r.queued_at, r.launched_by_id,
               row_number() OVER (PARTITION BY r.launched_by_id
                                  ORDER BY r.priority DESC, r.queued_at, r.id) AS nth_of_user
        FROM testruns_testrun r
        WHERE r.status = 'queued' AND NOT r.cancel_requested
    ), chosen AS (
        SELECT q.id FROM queue q LEFT JOIN running_per_user u ON u.user_id = q.launched_by_id
        WHERE (SELECT n FROM user_limit) = 0 OR q.launched_by_id IS NULL
           OR q.nth_of_user + COALESCE(u.n, 0) <= (SELECT n FROM user_limit)
        ORDER BY q.priority DESC, q.queued_at, q.id
        LIMIT GREATEST(p_free, 0)
    ), promoted AS (
        UPDATE testruns_testrun r SET status = 'running', phase = 'generating',
            started_at = statement_timestamp()
        FROM chosen WHERE r.id = chosen.id AND r.status = 'queued'
        RETURNING r.id, r.provider_id
    ), leased AS (
        -- A run slot is held until the run ends; only case leases are heartbeated and expire.
        INSERT INTO testruns_lease (semaphore_id, holder, run_id, acquired_at, expires_at)
        SELECT p_sem, 'run:' || id, id, now(), now() + interval '100 years' FROM promoted
        RETURNING testruns_lease.run_id
    ), counted AS (
        UPDATE testruns_semaphore SET in_use = in_use + (SELECT count(*) FROM leased)
        WHERE id = p_sem
    )
    SELECT promoted.id, promoted.provider_id FROM promoted ORDER BY promoted.id
$$;

-- Close a running run whose every case is done and hand its slot on: lock the "runs" row
-- (`p_runs`), set the run's final status from its totals, give back its slot and promote
-- the next runs. `finished` is NULL when there was nothing to finish, and also when the
-- "runs" row is missing (deleted in the admin): the caller's slower path creates it again.
CREATE OR REPLACE FUNCTION pcr_finish_run(p_run bigint, p_runs text, p_per_user text)
RETURNS TABLE (finished text, promoted jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_sem bigint;
    v_limit integer;
    v_in_use integer;
BEGIN
    finished := NULL; promoted := '[]'::jsonb;
    SELECT id INTO v_sem FROM testruns_semaphore WHERE name = p_runs FOR UPDATE;
    IF v_sem IS NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;
    UPDATE testruns_testrun SET phase = 'done', finished_at = now(),
        status = CASE WHEN error_count > 0 THEN 'error' WHEN failed_count > 0 THEN 'failed'
                      ELSE 'succeeded' END
    WHERE id = p_run AND status = 'running' AND done_count >= total_cases
    RETURNING status INTO finished;
    IF finished IS NULL THEN
        RETURN NEXT;
        RETURN;
    END IF;
    WITH gone AS (
        DELETE FROM testruns_lease WHERE run_id = p_run AND result_id IS NULL
        RETURNING semaphore_id
    )
    UPDATE testruns_semaphore s SET in_use = s.in_use - g.n
    FROM (SELECT semaphore_id, count(*) AS n FROM gone GROUP BY semaphore_id) g
    WHERE s.id = g.semaphore_id;
    SELECT "limit", in_use INTO v_limit, v_in_use FROM testruns_semaphore WHERE id = v_sem;
    IF v_in_use < v_limit THEN
        SELECT COALESCE(jsonb_agg(jsonb_build_array(a.run_id, a.provider_id)), '[]'::jsonb)
        INTO promoted FROM pcr_admit_runs(v_sem, v_limit - v_in_use, p_per_user) a;
    END IF;
    RETURN NEXT;
END
$$;

-- A finished case, in one call (one round trip, one transaction in autocommit):
-- 1. give back its call slot, locking the provider's row first (and, after a success, grow
--    the AIMD ceiling back towards the limit);
-- 2. the fence: if its lease was already gone (reclaimed, cancelled), write nothing more;
-- 3. write its outcome, exactly once (only while the result is still `running`), taking the
--    columns `p_fields` names over the row's own (jsonb_populate_record);
-- 4. skip the run's pending cases when `p_skip_rest` (stop on failure); add to the totals,
--    and say whether the run is complete and whether a progress event is due;
-- 5. if that was the run's last case, finish the run and promote the next runs
--    (pcr_finish_run: "runs" is locked after the provider's row, in name order);
-- 6. promote waiting cases into the free slots (the first kept for `p_keeper`, with its
--    case's fields), a run just promoted on this provider included: a run hands over to the
--    next in the same call.
CREATE OR REPLACE FUNCTION pcr_close_case(
    p_lease bigint, p_result bigint, p_run bigint, p_provider bigint,
    p_status text, p_fields jsonb, p_succeeded boolean, p_skip_rest boolean,
    p_keeper text, p_ttl double precision, p_event_interval double precision,
    p_runs text, p_per_user text
) RETURNS TABLE (held boolean, written boolean, complete boolean, event_due boolean,
                 admitted jsonb, finished text, promoted jsonb)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_sem bigint;
    v_limit integer;
    v_in_use integer;
    v_effective double precision;
    v_gone bigint;
    v_ceiling integer;
    v_rows integer;
    v_skipped integer := 0;
    v_done integer;
    v_total integer;
    v_last_event timestamptz;
BEGIN
    held := false; written := false; complete := false; event_due := false;
    admitted := '[]'::jsonb; finished := NULL; promoted := '[]'::jsonb;

    WITH gone AS (DELETE FROM testruns_lease WHERE id = p_lease RETURNING 1)
    UPDATE testruns_semaphore s SET in_use = s.in_use - (SELECT count(*) FROM gone),
        effective_limit = CASE
            WHEN NOT p_succeeded THEN s.effective_limit
            WHEN s.effective_limit + 1.0 / s.effective_limit >= s."limit" THEN NULL
            ELSE s.effective_limit + 1.0 / s.effective_limit END
    WHERE s.name = 'provider:' || p_provider
    RETURNING s.id, s."limit", s.in_use, s.effective_limit, (SELECT count(*) FROM gone)
    INTO v_sem, v_limit, v_in_use, v_effective, v_gone;
    IF v_sem IS NULL THEN
        RAISE EXCEPTION 'semaphore provider:% does not exist', p_provider;
    END IF;
    held := v_gone > 0;

    IF held THEN
        UPDATE testruns_testresult t SET
            (status, finished_at, prompt, output, assertion_results, score, latency_ms,
             tokens_in, tokens_out, cost, attempts, repeat_passes, repeat_results, cached,
             error) =
            (SELECT p_status, statement_timestamp(), f.prompt, f.output, f.assertion_results,
                    f.score, f.latency_ms, f.tokens_in, f.tokens_out, f.cost, f.attempts,
                    f.repeat_passes, f.repeat_results, f.cached, f.error
             FROM jsonb_populate_record(t, p_fields) f)
        WHERE t.id = p_result AND t.status = 'running';
        GET DIAGNOSTICS v_rows = ROW_COUNT;
        written := v_rows > 0;
    END IF;

    IF written THEN
        IF p_skip_rest THEN
            UPDATE testruns_testresult SET status = 'skipped', finished_at = statement_timestamp()
            WHERE run_id = p_run AND status = 'pending';
            GET DIAGNOSTICS v_skipped = ROW_COUNT;
        END IF;
        UPDATE testruns_testrun SET
            done_count = done_count + 1 + v_skipped,
            passed_count = passed_count + (p_status = 'passed')::integer,
            failed_count = failed_count + (p_status = 'failed')::integer,
            error_count = error_count + (p_status = 'error')::integer,
            tokens_in = tokens_in + COALESCE((p_fields->>'tokens_in')::bigint, 0),
            tokens_out = tokens_out + COALESCE((p_fields->>'tokens_out')::bigint, 0),
            cost = cost + COALESCE((p_fields->>'cost')::numeric, 0)
        WHERE id = p_run
        RETURNING done_count, total_cases, last_event_at INTO v_done, v_total, v_last_event;
        complete := v_done >= v_total;
        event_due := v_last_event IS NULL
            OR v_last_event < clock_timestamp() - make_interval(secs => p_event_interval);
        IF complete THEN
            SELECT f.finished, f.promoted INTO finished, promoted
            FROM pcr_finish_run(p_run, p_runs, p_per_user) f;
        END IF;
    END IF;

    v_ceiling := CASE WHEN v_effective IS NULL THEN v_limit
                      ELSE LEAST(v_limit, floor(v_effective)::integer) END;
    IF v_in_use < v_ceiling THEN
        -- The case kept for the keeper comes with what running it reads (its thread then
        -- needs no query to load it).
        SELECT COALESCE(jsonb_agg(jsonb_build_array(
                   a.result_id, a.lease_id, a.holder, a.run_id,
                   CASE WHEN a.holder <> '' THEN jsonb_build_object(
                       'case_id', t.case_id, 'position', t.position, 'case_name', t.case_name,
                       'variables', t.variables, 'assertions', t.assertions,
                       'threshold', t.threshold) END)), '[]'::jsonb)
        INTO admitted
        FROM pcr_admit_cases(v_sem, p_provider, v_ceiling - v_in_use, p_ttl, p_keeper) a
        JOIN testruns_testresult t ON t.id = a.result_id;
    END IF;
    RETURN NEXT;
END
$$;
