<?php

/*
 * PHPUnit's bootstrap (../phpunit.xml.dist): the client without Composer,
 * and the classes the tests share.
 */

declare(strict_types=1);

require __DIR__ . '/../autoload.php';
require __DIR__ . '/Support/Daemon.php';
require __DIR__ . '/Support/Mail.php';
require __DIR__ . '/Support/DaemonTestCase.php';
