"""An app with a RabbitMQ broker and no ``unique_redis_url``: celery-unique has no Redis."""

from celery import Celery

app = Celery("no-redis", broker="amqp://guest:guest@127.0.0.1:5672//", set_as_current=False)
