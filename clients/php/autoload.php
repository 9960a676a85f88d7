<?php

/*
 * Loads the SmtpGate\ classes without Composer:
 *     require '/path/to/clients/php/autoload.php';
 * (With Composer, its PSR-4 autoloader does the same from composer.json.)
 */

declare(strict_types=1);

spl_autoload_register(static function (string $class): void {
    $prefix = 'SmtpGate\\';
    if (strncmp($class, $prefix, strlen($prefix)) !== 0) {
        return;
    }
    $file = __DIR__ . '/src/' . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
    if (is_file($file)) {
        require $file;
    }
});
