from __future__ import annotations

from django.urls import path

from testruns.web import comparing, reference, reviews, schedules, versions, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("dashboard.json", views.dashboard_json, name="dashboard-json"),
    path("launch/", views.launch, name="launch"),
    path("history/", views.history, name="history"),
    path("runs/<int:pk>/", views.run_detail, name="run-detail"),
    path("runs/<int:pk>/status.json", views.run_status, name="run-status"),
    path("runs/<int:pk>/results.json", views.run_results, name="run-results"),
    path(
        "runs/<int:pk>/results/<int:position>/detail/",
        views.result_detail,
        name="result-detail",
    ),
    path("runs/<int:pk>/cancel/", views.run_cancel, name="run-cancel"),
    path("runs/<int:pk>/report/", views.report, name="report"),
    path("runs/<int:pk>/baseline/", views.pin_baseline, name="pin-baseline"),
    path("runs/<int:pk>/report.csv", views.report_csv, name="report-csv"),
    path("runs/<int:pk>/report.json", views.report_json, name="report-json"),
    path("runs/<int:pk>/junit.xml", views.report_junit, name="report-junit"),
    path("runs/<int:pk>/review/", reviews.mark_run, name="review-run"),
    path("reviews/", reviews.review_queue, name="review-queue"),
    path("reviews/next/", reviews.next_review, name="review-next"),
    path("reviews/<int:pk>/", reviews.review, name="review"),
    path("compare/", comparing.compare, name="compare"),
    path("schedules/", schedules.schedule_list, name="schedules"),
    path("schedules/new/", schedules.schedule_edit, name="schedule-new"),
    path("schedules/<int:pk>/", schedules.schedule_edit, name="schedule-edit"),
    path("schedules/<int:pk>/pause/", schedules.schedule_pause, name="schedule-pause"),
    path("comparisons/<uuid:group>/", comparing.comparison, name="comparison"),
    path("reference/assertions/", reference.assertion_reference, name="assertion-reference"),
    path("cards/<int:card_pk>/versions/<int:number>/", versions.version, name="version"),
    path(
        "cards/<int:card_pk>/versions/<int:number>/restore/",
        versions.restore,
        name="version-restore",
    ),
]
