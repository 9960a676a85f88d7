<?php

/*
 * Loaded by the PHP snippets that tests/test_php_client.py runs under real
 * `php`: the client without Composer, and outcome(), describe() and report().
 */

declare(strict_types=1);

require __DIR__ . '/../autoload.php';
require __DIR__ . '/Support/snippet_functions.php';
