# A finished run's aggregates over its results, stored once (issue 10): latency p50 and p95
# and the number of skipped cases, with the time they were stored. The backfill computes them
# for every run that had finished before this migration, in one statement (one pass over the
# results of each run), as engine.run_aggregates does for one run at its finish. And an index
# in the history's order (newest first), so its first page does not sort every run.

from django.db import migrations, models

BACKFILL = """
UPDATE testruns_testrun AS run SET
    latency_p50_ms = agg.p50, latency_p95_ms = agg.p95, skipped_count = agg.skipped,
    aggregated_at = now()
FROM testruns_testrun AS finished
CROSS JOIN LATERAL (
    SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95,
           count(*) FILTER (WHERE status = 'skipped') AS skipped
    FROM testruns_testresult WHERE run_id = finished.id
) AS agg
WHERE run.id = finished.id
  AND finished.status IN ('succeeded', 'failed', 'error', 'cancelled')
"""


class Migration(migrations.Migration):

    dependencies = [
        ('testruns', '0007_gate_functions'),
    ]

    operations = [
        migrations.AddField(
            model_name='testrun',
            name='aggregated_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='testrun',
            name='latency_p50_ms',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='testrun',
            name='latency_p95_ms',
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name='testrun',
            name='skipped_count',
            field=models.PositiveIntegerField(default=0),
        ),
        # Reversed, the fields go away with their values; nothing else to undo.
        migrations.RunSQL(BACKFILL, reverse_sql=migrations.RunSQL.noop),
        migrations.AddIndex(
            model_name='testrun',
            index=models.Index(fields=['-queued_at', '-id'], name='run_recent'),
        ),
    ]
