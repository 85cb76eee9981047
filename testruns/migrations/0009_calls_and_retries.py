# Progress in model calls and retries apart from repeats (issue 12): a run counts the calls
# it has made (cases x repeats in all, `calls_done`), and a result its retries. pcr_close_case
# writes both; the SQL is in the .sql file of the same name, frozen with this migration. The
# backfill counts a finished run's calls as all done.

from pathlib import Path

from django.db import migrations, models

FUNCTIONS = Path(__file__).with_suffix(".sql").read_text()
PREVIOUS = (Path(__file__).parent / "0007_gate_functions.sql").read_text()
BACKFILL = (
    "UPDATE testruns_testrun SET calls_done = done_count * GREATEST(repeats, 1) "
    "WHERE done_count > 0"
)


class Migration(migrations.Migration):

    dependencies = [
        ('testruns', '0008_run_aggregates'),
    ]

    operations = [
        migrations.AddField(
            model_name='testresult',
            name='retries',
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name='testrun',
            name='calls_done',
            field=models.PositiveBigIntegerField(default=0),
        ),
        migrations.RunSQL(BACKFILL, reverse_sql=migrations.RunSQL.noop),
        migrations.RunSQL(FUNCTIONS, reverse_sql=PREVIOUS),
    ]
