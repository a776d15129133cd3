"""zae_celery.infra: CloudFormation assets for the engine's DynamoDB table."""
