# Schedules, notifications and monotonic counters for /metrics (issue 15). Runs that had
# started or finished before this migration are marked as counted and settled: counters start
# at zero here (Prometheus reads a new series as such) and no notice goes out about old runs.

import django.core.validators
import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

BACKFILL = [
    "UPDATE testruns_testrun SET wait_counted = true WHERE started_at IS NOT NULL",
    "UPDATE testruns_testrun SET settled_at = COALESCE(finished_at, now()) "
    "WHERE status IN ('succeeded', 'failed', 'error', 'cancelled')",
]


class Migration(migrations.Migration):

    dependencies = [
        ('testruns', '0009_calls_and_retries'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddField(
            model_name='testrun',
            name='settled_at',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='testrun',
            name='wait_counted',
            field=models.BooleanField(default=False, editable=False),
        ),
        migrations.CreateModel(
            name='MetricCounter',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=100)),
                ('labels', models.JSONField(default=dict)),
                ('value', models.FloatField(default=0)),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('name', 'labels'), name='one_counter_per_series')],
            },
        ),
        migrations.CreateModel(
            name='NotificationDelivery',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('channel', models.CharField(choices=[('webhook', 'Webhook (JSON, signed with HMAC-SHA256)'), ('slack', 'Slack-compatible incoming webhook'), ('email', 'E-mail')], max_length=20)),
                ('status', models.CharField(choices=[('pending', 'Pending'), ('sending', 'Sending'), ('retrying', 'Retrying'), ('sent', 'Sent'), ('skipped', 'Skipped'), ('failed', 'Failed')], default='pending', max_length=20)),
                ('events', models.JSONField(blank=True, default=list, help_text='The events the run met.')),
                ('payload', models.JSONField(blank=True, default=dict, help_text='What was sent (the same at every attempt).')),
                ('summary', models.TextField(blank=True, help_text='What the notice said, in a line.')),
                ('attempts', models.PositiveIntegerField(default=0)),
                ('last_error', models.TextField(blank=True)),
                ('created_at', models.DateTimeField()),
                ('dispatched_at', models.DateTimeField(blank=True, null=True)),
                ('next_attempt_at', models.DateTimeField(blank=True, null=True)),
                ('claimed_until', models.DateTimeField(blank=True, null=True)),
                ('finished_at', models.DateTimeField(blank=True, null=True)),
                ('run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='notifications', to='testruns.testrun')),
            ],
            options={
                'verbose_name_plural': 'notification deliveries',
                'ordering': ['-created_at', '-pk'],
            },
        ),
        migrations.CreateModel(
            name='DeliveryAttempt',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('number', models.PositiveIntegerField()),
                ('started_at', models.DateTimeField()),
                ('finished_at', models.DateTimeField()),
                ('ok', models.BooleanField()),
                ('status_code', models.PositiveIntegerField(blank=True, null=True)),
                ('error', models.TextField(blank=True)),
                ('delivery', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='attempt_log', to='testruns.notificationdelivery')),
            ],
            options={
                'ordering': ['delivery', 'number'],
            },
        ),
        migrations.CreateModel(
            name='NotificationRule',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=200)),
                ('channel', models.CharField(choices=[('webhook', 'Webhook (JSON, signed with HMAC-SHA256)'), ('slack', 'Slack-compatible incoming webhook'), ('email', 'E-mail')], default='webhook', max_length=20)),
                ('url', models.URLField(blank=True, help_text='Where webhook and Slack notices are POSTed.', max_length=500)),
                ('secret_env', models.CharField(blank=True, help_text='Webhooks: the name of the environment variable (on the worker hosts) that holds the shared secret; the body is signed with it in X-PCR-Signature. Slack: the variable that holds the incoming-webhook URL (itself a secret), instead of the URL above. The secret itself is never stored.', max_length=100)),
                ('recipients', models.TextField(blank=True, help_text='E-mail: addresses, comma-separated.')),
                ('on_regression', models.BooleanField(default=True, help_text='A case got worse than its baseline beyond what chance explains (docs/statistics.md).')),
                ('on_failure', models.BooleanField(default=True, help_text='The run failed.')),
                ('on_error', models.BooleanField(default=True, help_text='The run ended in an error.')),
                ('on_finish', models.BooleanField(default=False, help_text='Every finished run.')),
                ('enabled', models.BooleanField(default=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('card', models.ForeignKey(blank=True, help_text='Every run of this card, however it was launched.', null=True, on_delete=django.db.models.deletion.CASCADE, related_name='notifications', to='testruns.promptcard')),
            ],
            options={
                'ordering': ['name', 'pk'],
            },
        ),
        migrations.AddField(
            model_name='notificationdelivery',
            name='rule',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='deliveries', to='testruns.notificationrule'),
        ),
        migrations.CreateModel(
            name='Schedule',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(max_length=200)),
                ('card_tag', models.CharField(blank=True, help_text='Run every card with this tag (as it is at each due time).', max_length=50)),
                ('cron', models.CharField(help_text='Five fields (minute hour day month weekday), six with seconds first, or @hourly, @daily, ...', max_length=120)),
                ('time_zone', models.CharField(default='UTC', help_text='The IANA time zone the cron fields are read in.', max_length=64)),
                ('paused', models.BooleanField(default=False, help_text='A paused schedule launches nothing.')),
                ('priority', models.IntegerField(default=0, help_text='Higher runs first.', validators=[django.core.validators.MinValueValidator(-100), django.core.validators.MaxValueValidator(100)])),
                ('max_concurrent_tests', models.PositiveIntegerField(default=4, validators=[django.core.validators.MinValueValidator(1), django.core.validators.MaxValueValidator(64)])),
                ('timeout_seconds', models.FloatField(default=60, validators=[django.core.validators.MinValueValidator(1), django.core.validators.MaxValueValidator(3600)])),
                ('stop_on_failure', models.BooleanField(default=False)),
                ('max_retries', models.PositiveIntegerField(default=2, validators=[django.core.validators.MinValueValidator(0), django.core.validators.MaxValueValidator(10)])),
                ('use_cache', models.BooleanField(default=False, help_text="Answer from earlier runs' identical requests where possible (only a case's first repeat: see repeats).")),
                ('repeats', models.PositiveIntegerField(default=1, help_text='How many times each case asks the model; it passes only when every repeat passes (pass^N). With the cache on, only the first repeat may be answered from it; the others always ask the model.', validators=[django.core.validators.MinValueValidator(1), django.core.validators.MaxValueValidator(20)])),
                ('next_due_at', models.DateTimeField(blank=True, editable=False, null=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
                ('card', models.ForeignKey(blank=True, help_text='The card to run; or leave it empty and give a tag.', null=True, on_delete=django.db.models.deletion.CASCADE, related_name='schedules', to='testruns.promptcard')),
                ('owner', models.ForeignKey(blank=True, help_text='Runs are launched as this user, who must be allowed to launch runs.', null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='schedules', to=settings.AUTH_USER_MODEL)),
                ('providers', models.ManyToManyField(help_text='One run per card and provider.', related_name='schedules', to='testruns.provider')),
            ],
            options={
                'ordering': ['name', 'pk'],
            },
        ),
        migrations.AddField(
            model_name='notificationrule',
            name='schedule',
            field=models.ForeignKey(blank=True, help_text='Runs this schedule launched; or leave it empty and choose a card.', null=True, on_delete=django.db.models.deletion.CASCADE, related_name='notifications', to='testruns.schedule'),
        ),
        migrations.CreateModel(
            name='ScheduleLaunch',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('due_at', models.DateTimeField()),
                ('launched_at', models.DateTimeField()),
                ('missed', models.PositiveIntegerField(default=0, help_text='Earlier due times that passed while no worker ran, covered by this.')),
                ('run_count', models.PositiveIntegerField(default=0)),
                ('error', models.TextField(blank=True, help_text='Why nothing was launched, if so.')),
                ('worker', models.CharField(blank=True, help_text='The process that launched it (host:pid:boot).', max_length=200)),
                ('schedule', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='launches', to='testruns.schedule')),
            ],
            options={
                'ordering': ['-due_at'],
            },
        ),
        migrations.AddField(
            model_name='testrun',
            name='schedule_launch',
            field=models.ForeignKey(blank=True, help_text='The scheduled launch that queued it, if one did.', null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='runs', to='testruns.schedulelaunch'),
        ),
        migrations.AddIndex(
            model_name='testrun',
            index=models.Index(condition=models.Q(('settled_at', None)), fields=['id'], name='run_unsettled'),
        ),
        migrations.AddIndex(
            model_name='testrun',
            index=models.Index(condition=models.Q(('started_at__isnull', False), ('wait_counted', False)), fields=['id'], name='run_wait_uncounted'),
        ),
        migrations.AddConstraint(
            model_name='deliveryattempt',
            constraint=models.UniqueConstraint(fields=('delivery', 'number'), name='one_attempt_per_number'),
        ),
        migrations.AddIndex(
            model_name='notificationdelivery',
            index=models.Index(condition=models.Q(('status__in', ['pending', 'sending', 'retrying'])), fields=['status'], name='delivery_open'),
        ),
        migrations.AddConstraint(
            model_name='notificationdelivery',
            constraint=models.UniqueConstraint(fields=('rule', 'run'), name='one_delivery_per_rule_and_run'),
        ),
        migrations.AddIndex(
            model_name='schedule',
            index=models.Index(condition=models.Q(('paused', False)), fields=['next_due_at'], name='schedule_due'),
        ),
        migrations.AddConstraint(
            model_name='schedule',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('card__isnull', False), ('card_tag', '')), models.Q(('card__isnull', True), models.Q(('card_tag', ''), _negated=True)), _connector='OR'), name='schedule_card_or_tag'),
        ),
        migrations.AddConstraint(
            model_name='notificationrule',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('schedule__isnull', False), ('card__isnull', True)), models.Q(('schedule__isnull', True), ('card__isnull', False)), _connector='OR'), name='notification_schedule_or_card'),
        ),
        migrations.AddConstraint(
            model_name='schedulelaunch',
            constraint=models.UniqueConstraint(fields=('schedule', 'due_at'), name='one_launch_per_due_time'),
        ),
        migrations.RunSQL(BACKFILL, reverse_sql=migrations.RunSQL.noop),
    ]
